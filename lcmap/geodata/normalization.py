"""Per-band normalisation statistics of the imagery, stored with every training run.

Besides mean and std, the statistics record the training imagery's data type and value range
(0.1st and 99.9th percentiles per band of the sampled pixels): :func:`imagery_mismatch` compares
new imagery with them, so that a model trained on 8-bit imagery is not silently fed 16-bit data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from lcmap.errors import LcmapInputError
from lcmap.geodata.io import imagery_valid, open_raster

if TYPE_CHECKING:
    from lcmap.geodata.datasets import HRImagery

__all__ = ["BandStats", "compute_band_stats", "imagery_mismatch", "sample_imagery_range", "RANGE_PERCENTILES"]

#: The value range recorded per band: these percentiles of the sampled valid pixels.
RANGE_PERCENTILES = (0.1, 99.9)


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation, in the imagery's own units (digital numbers), and the
    imagery's data type and per-band value range (``low``/``high``: :data:`RANGE_PERCENTILES`);
    ``dtype``/``low``/``high`` are None in statistics written by older lcmap versions."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def range_record(self) -> dict[str, Any] | None:
        """``{"dtype", "low", "high"}`` (JSON types), or None when not recorded."""
        if self.dtype is None or self.low is None or self.high is None:
            return None
        return {"dtype": self.dtype, "low": list(self.low), "high": list(self.high)}

    def to_json(self, path: str | Path) -> None:
        data: dict[str, Any] = {"mean": list(self.mean), "std": list(self.std)}
        data.update(self.range_record() or {})
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> BandStats:
        data = json.loads(Path(path).read_text())
        low, high = data.get("low"), data.get("high")
        return cls(
            tuple(data["mean"]),
            tuple(data["std"]),
            data.get("dtype"),
            tuple(low) if low is not None else None,
            tuple(high) if high is not None else None,
        )


def compute_band_stats(imagery: HRImagery, max_pixels_per_file: int = 1_000_000, seed: int = 0) -> BandStats:
    """Mean and std per band over valid pixels, from up to ``max_pixels_per_file`` pixels per file.

    Each file is read in up to 16 random 256 px windows (or whole when small), so the cost stays
    bounded on province-size mosaics. Pixels where every band equals the nodata value are skipped.

    Raises:
        LcmapInputError: no valid pixel was found (all-nodata imagery), naming the files.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(imagery.count, np.float64)
    total_sq = np.zeros(imagery.count, np.float64)
    low = np.full(imagery.count, np.inf)
    high = np.full(imagery.count, -np.inf)
    dtypes = set()
    n = 0
    for path in imagery.files:
        with open_raster(path, "imagery") as src:
            dtypes.add(src.dtypes[0])
            pixels = _sample_pixels(src, imagery.nodata, max_pixels_per_file, 16, rng)
        if pixels.shape[1]:
            lo, hi = np.percentile(pixels, RANGE_PERCENTILES, axis=1)
            low, high = np.minimum(low, lo), np.maximum(high, hi)
        total += pixels.sum(axis=1)
        total_sq += (pixels**2).sum(axis=1)
        n += pixels.shape[1]
    if n == 0:
        files = ", ".join(imagery.files[:3]) + (f" (+{len(imagery.files) - 3} more)" if len(imagery.files) > 3 else "")
        raise LcmapInputError(
            f"the imagery holds no valid pixel (every pixel sampled has all bands equal to the nodata value "
            f"{imagery.nodata:g}): {files}. Check --images (and the files' nodata value)."
        )
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-6))
    return BandStats(
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        dtype="/".join(sorted(dtypes)),
        low=tuple(float(v) for v in low),
        high=tuple(float(v) for v in high),
    )


def _sample_pixels(src: Any, nodata: float, max_pixels: int, max_windows: int, rng: np.random.Generator) -> np.ndarray:
    """Valid pixels ``(bands, n)`` float64 of an open file: whole when it has at most ``max_pixels``,
    else up to ``max_windows`` random 256 px windows."""
    if src.width * src.height <= max_pixels:
        windows = [Window(0, 0, src.width, src.height)]
    else:
        size = 256
        windows = [
            Window(
                int(rng.integers(0, max(1, src.width - size))),
                int(rng.integers(0, max(1, src.height - size))),
                min(size, src.width),
                min(size, src.height),
            )
            for _ in range(min(max_windows, max_pixels // (size * size) or 1))
        ]
    parts = []
    for window in windows:
        data = src.read(window=window).astype(np.float64)
        parts.append(data[:, imagery_valid(data, nodata)])
    return np.concatenate(parts, axis=1)


def sample_imagery_range(
    files: Sequence[str], nodata: float, max_files: int = 8, seed: int = 0
) -> tuple[str, np.ndarray]:
    """The data type(s) and the per-band 99.9th percentile of valid pixels of up to ``max_files``
    files (evenly spread over ``files``), 4 random 256 px windows each (or whole when small).

    Returns:
        ``(dtype, high)``: ``dtype`` e.g. ``"uint8"`` (``"uint8/uint16"`` when mixed); ``high``
        float64 ``(bands,)`` (NaN when no valid pixel was sampled).
    """
    rng = np.random.default_rng(seed)
    chosen = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, min(max_files, len(files))).round())]
    dtypes, parts = set(), []
    for path in chosen:
        with open_raster(path, "imagery") as src:
            dtypes.add(src.dtypes[0])
            parts.append(_sample_pixels(src, nodata, 4 * 256 * 256, 4, rng))
    pixels = np.concatenate(parts, axis=1)
    high = np.percentile(pixels, RANGE_PERCENTILES[1], axis=1) if pixels.shape[1] else np.full(pixels.shape[0], np.nan)
    return "/".join(sorted(dtypes)), high


def imagery_mismatch(trained: dict[str, Any], dtype: str, high: np.ndarray, scale: float | None) -> str | None:
    """How new imagery differs from the training imagery, or None when it fits.

    Args:
        trained: the training imagery's :meth:`BandStats.range_record`.
        dtype: the new imagery's data type(s) (:func:`sample_imagery_range`).
        high: its per-band 99.9th percentile, imagery units, ``(bands,)``.
        scale: the factor the imagery is multiplied by before normalisation (``--input-scale``), or
            None: then a different data type is a mismatch too.

    A band is far outside the training range when its 99.9th percentile (times ``scale``) is above
    the training 99.9th percentile by more than the whole training range (0.1th to 99.9th).
    """
    problems = []
    if scale is None and dtype != trained["dtype"]:
        problems.append(f"its data type is {dtype}, the training imagery's {trained['dtype']}")
    t_low, t_high = np.asarray(trained["low"], np.float64), np.asarray(trained["high"], np.float64)
    if t_low.shape == high.shape:
        seen = high * (1.0 if scale is None else scale)
        far = np.isfinite(seen) & (seen > t_high + np.maximum(t_high - t_low, 1.0))
        if far.any():
            bands = ", ".join(
                f"band {b + 1} up to {seen[b]:.6g} vs {t_low[b]:.6g}-{t_high[b]:.6g}" for b in np.flatnonzero(far)
            )
            scaled = "" if scale is None else f" after --input-scale {scale:g}"
            problems.append(f"its values{scaled} are far above the training range ({bands})")
    return "; ".join(problems) or None

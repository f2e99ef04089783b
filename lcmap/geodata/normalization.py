"""Per-band normalisation statistics of the imagery, stored with every training run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from lcmap.geodata.io import imagery_valid, open_raster

if TYPE_CHECKING:
    from lcmap.geodata.datasets import HRImagery

__all__ = ["BandStats", "compute_band_stats"]


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation, in the imagery's own units (digital numbers)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"mean": list(self.mean), "std": list(self.std)}, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> BandStats:
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["mean"]), tuple(data["std"]))


def compute_band_stats(imagery: HRImagery, max_pixels_per_file: int = 1_000_000, seed: int = 0) -> BandStats:
    """Mean and std per band over valid pixels, from up to ``max_pixels_per_file`` pixels per file.

    Each file is read in up to 16 random 256 px windows (or whole when small), so the cost stays
    bounded on province-size mosaics. Pixels where every band equals the nodata value are skipped.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(imagery.count, np.float64)
    total_sq = np.zeros(imagery.count, np.float64)
    n = 0
    for path in imagery.files:
        with open_raster(path, "imagery") as src:
            if src.width * src.height <= max_pixels_per_file:
                windows = [Window(0, 0, src.width, src.height)]
            else:
                size = 256
                windows = [
                    Window(
                        int(rng.integers(0, max(1, src.width - size))),
                        int(rng.integers(0, max(1, src.height - size))),
                        size,
                        size,
                    )
                    for _ in range(min(16, max_pixels_per_file // (size * size) or 1))
                ]
            for window in windows:
                data = src.read(window=window).astype(np.float64)
                valid = imagery_valid(data, imagery.nodata)
                pixels = data[:, valid]
                total += pixels.sum(axis=1)
                total_sq += (pixels**2).sum(axis=1)
                n += pixels.shape[1]
    if n == 0:
        raise ValueError("no valid imagery pixel to compute normalisation statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-6))
    return BandStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))

"""What the LR labels hold and mean for training: their codes over the area used (checked against
the legend before any work), and, for mixed LR classes, the classes their label accepts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lcmap.errors import LcmapInputError

__all__ = ["allowed_classes_for", "resolve_mixed_classes", "scan_label_codes"]


def _read_window_values(
    path: str, bounds: tuple[float, float, float, float] | None, crs: Any, max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unique values and counts of a raster inside ``bounds`` (in ``crs``), decimated above ``max_pixels``."""
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds

    with rasterio.open(path) as src:
        window = Window(0, 0, src.width, src.height)
        if bounds is not None:
            b = transform_bounds(crs, src.crs, *bounds, densify_pts=21) if crs != src.crs else bounds
            w = from_bounds(*b, transform=src.transform)
            w = w.round_offsets(op="floor").round_lengths(op="ceil")
            col0, row0 = max(0, int(w.col_off) - 1), max(0, int(w.row_off) - 1)
            col1 = min(src.width, int(w.col_off + w.width) + 1)
            row1 = min(src.height, int(w.row_off + w.height) + 1)
            if col1 <= col0 or row1 <= row0:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            window = Window(col0, row0, col1 - col0, row1 - row0)
        n = int(window.width * window.height)
        if n > max_pixels:
            f = math.sqrt(n / max_pixels)
            shape = (max(1, int(window.height / f)), max(1, int(window.width / f)))
            data = src.read(1, window=window, out_shape=shape)
        else:
            data = src.read(1, window=window)
    values, counts = np.unique(data, return_counts=True)
    return values, counts


def scan_label_codes(
    label_ds: Any,
    bounds: tuple[float, float, float, float] | None,
    crs: Any,
    max_pixels: int = 20_000_000,
    option: str | None = "--legend",
) -> dict[int, int]:
    """Check every label file's values (inside ``bounds``) against its legend, before training.

    Args:
        label_ds: a :class:`~lcmap.geodata.datasets.LabelRaster` (files, legend, file nodata).
        bounds: ``(xmin, ymin, xmax, ymax)`` in ``crs`` of the area that will be used, or None.
        crs: CRS of ``bounds``.
        max_pixels: above this many pixels per file, the window is read decimated.
        option: the command-line option that chose the legend, named when codes do not fit it.

    Returns:
        ``{legend index: pixel count}`` over the files (nodata left out).

    Raises:
        UnknownLabelError: a file holds codes outside the legend (the message lists them and the file).
    """
    from lcmap.geodata.datasets import encode_labels
    from lcmap.geodata.legends import IGNORE_INDEX

    counts: dict[int, int] = {}
    for path in label_ds.files:
        values, n = _read_window_values(path, bounds, crs, max_pixels)
        if values.size == 0:
            continue
        idx = encode_labels(values, label_ds, source=path, option=option)  # raises UnknownLabelError
        for i, c in zip(idx.tolist(), n.tolist(), strict=True):
            if i != IGNORE_INDEX:
                counts[i] = counts.get(i, 0) + int(c)
    return counts


def resolve_mixed_classes(legend: Any, given: dict[int, list[str]], use_defaults: bool) -> dict[int, list[str]]:
    """The mixed classes to train with: the legend's declared ones (``use_defaults``), with the
    codes of ``given`` (the user's ``--mixed-class``) replacing them code by code; sorted by code."""
    mixed = dict(legend.default_mixed_classes()) if use_defaults else {}
    mixed.update({int(k): list(v) for k, v in given.items()})
    return {code: mixed[code] for code in sorted(mixed)}


def allowed_classes_for(legend: Any, mixed: dict[int, list[str]]) -> list[list[int]] | None:
    """Per legend index, the indices acceptable for its label: itself, or for a mixed class the
    classes of the named target classes (itself excluded). None when nothing is mixed."""
    if not mixed:
        return None
    unknown = sorted(set(mixed) - set(legend.codes))
    if unknown:
        raise LcmapInputError(f"mixed_classes names codes {unknown} that legend {legend.name} does not have")
    targets = set(legend.target.names)
    rows = []
    for i, cls in enumerate(legend.classes):
        names = mixed.get(cls.code)
        if names is None:
            rows.append([i])
            continue
        bad = sorted(set(names) - targets)
        if bad:
            raise LcmapInputError(
                f"mixed_classes {cls.code}: {bad} are not target classes ({', '.join(legend.target.names)})"
            )
        row = [k for k, c in enumerate(legend.classes) if c.target in names and c.code != cls.code]
        if not row:
            raise LcmapInputError(f"mixed_classes {cls.code}: no other class of {legend.name} maps to {names}")
        rows.append(row)
    return rows

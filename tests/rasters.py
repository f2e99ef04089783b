"""Tiny seeded fake rasters for the tests (real rasters live in tests/data/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_origin

UTM17 = "EPSG:32617"


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM17,
    transform: Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write ``data`` (``(bands, H, W)`` or ``(H, W)``) as a GeoTIFF; returns ``path``."""
    if data.ndim == 2:
        data = data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"crs": crs} if crs else {}
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        transform=transform or from_origin(500_000, 4_000_000, 1, 1),
        nodata=nodata,
        **kwargs,
    ) as dst:
        dst.write(data)
    return path


def fake_imagery(
    path: Path,
    h: int = 64,
    w: int = 64,
    bands: int = 4,
    dtype=np.uint8,
    x0: float = 500_000,
    y0: float = 4_000_000,
    res: float = 1.0,
    crs: str = UTM17,
    seed: int = 0,
    nodata: float | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 4000
    data = rng.integers(1, hi, size=(bands, h, w)).astype(dtype)
    return write_raster(path, data, crs, from_origin(x0, y0, res, res), nodata)

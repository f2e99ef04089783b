"""Raw imagery strips and per-window normalisation (``lcmap.pipeline.strips``), on tiny files
written here: two overlapping files with nodata holes, 8-bit and 16-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from lcmap.geodata.datasets import open_imagery
from lcmap.pipeline.strips import StripReader, window_into
from lcmap.pipeline.tiling import WindowGrid, output_grid

X0, Y0 = 500_000.0, 4_200_000.0


def _write(path: Path, data: np.ndarray, c0: int) -> Path:
    """``data`` ``(C, h, w)`` at column ``c0`` of a 1 m grid starting at (X0, Y0); nodata 0."""
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype.name, crs="EPSG:32617", transform=from_origin(X0 + c0, Y0, 1.0, 1.0), nodata=0,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


@pytest.fixture(params=["uint8", "uint16"])
def two_files(tmp_path, request):
    """``a.tif`` columns 0-39 and ``b.tif`` columns 30-59 (overlap 30-39), 24 rows, 3 bands; a hole
    of nodata (every band 0) in each, one of them inside the overlap."""
    dtype = np.dtype(request.param)
    rng = np.random.default_rng(5)
    a = rng.integers(1, 200, (3, 24, 40)).astype(dtype)
    b = rng.integers(1, 200, (3, 24, 30)).astype(dtype)
    a[:, 2:5, 33:36] = 0  # a hole where b has data: b's pixels are used there
    b[:, 10:12, 20:25] = 0  # a hole only b covers: invalid
    _write(tmp_path / "a.tif", a, 0)
    _write(tmp_path / "b.tif", b, 30)
    full = np.zeros((3, 24, 60), dtype)  # the mosaic by hand: first file wins where valid
    full[:, :, 30:60] = b
    valid_a = (a != 0).any(axis=0)
    full[:, :, :40] = np.where(valid_a[None], a, full[:, :, :40])
    valid = (full != 0).any(axis=0)
    return tmp_path, full, valid, dtype


def test_strips_keep_the_imagery_type_and_the_first_valid_file_wins(two_files):
    folder, full, valid, dtype = two_files
    ds = open_imagery(sorted(folder.glob("*.tif")))
    grid = output_grid(ds.crs.to_wkt(), (X0, Y0 - 24, X0 + 60, Y0), (1.0, 1.0))
    reader = StripReader(ds, grid)
    assert reader.prepare() == dtype  # 1 byte per band for 8-bit imagery, not float32
    out = np.empty((3, 16, 60), reader.dtype)
    image, ok, r0, c0 = reader.read(4, 20, 0, 60, out)
    assert (r0, c0) == (4, 0) and image.shape == (3, 16, 60)
    assert np.array_equal(ok, valid[4:20])
    assert np.array_equal(image[:, ok], full[:, 4:20][:, ok])


def test_window_into_normalises_feeds_invalid_pixels_as_the_band_mean_and_mirrors(two_files):
    folder, full, valid, _ = two_files
    ds = open_imagery(sorted(folder.glob("*.tif")))
    grid = output_grid(ds.crs.to_wkt(), (X0, Y0 - 24, X0 + 60, Y0), (1.0, 1.0))
    reader = StripReader(ds, grid)
    wg = WindowGrid(tile=16, overlap=4, height=24, width=60)
    mean = np.array([100.0, 90.0, 80.0], np.float32).reshape(3, 1, 1)
    std = np.array([50.0, 40.0, 30.0], np.float32).reshape(3, 1, 1)
    want_all = (full.astype(np.float32) - mean) / std
    want_all[:, ~valid] = 0.0
    strip = np.empty((3, 16, 60), reader.prepare())
    raw, ok, sr0, sc0 = reader.read(0, 16, 0, 60, strip)
    dst = np.empty((3, 16, 16), np.float32)
    for j in range(wg.n_cols):  # inside the extent: the normalised pixels themselves
        window_into(dst, grid, wg, raw, ok, sr0, sc0, 0, j, mean, std)
        c = j * wg.stride
        if c + 16 <= 60:
            assert np.array_equal(dst, want_all[:, 0:16, c : c + 16])
    # the last window overhangs the 60 px extent: mirrored, invalid pixels still the band mean
    last = wg.n_cols - 1
    window_into(dst, grid, wg, raw, ok, sr0, sc0, 0, last, mean, std)
    c = last * wg.stride
    inside = 60 - c
    assert np.array_equal(dst[:, :, :inside], want_all[:, 0:16, c:60])
    mirrored = want_all[:, 0:16, c:60][:, :, ::-1][:, :, 1 : 1 + 16 - inside]
    assert np.array_equal(dst[:, :, inside:], mirrored)

"""Raw imagery strips and per-window normalisation (``lcmap.pipeline.prediction.strips``), on tiny files
written here: two overlapping files with nodata holes, 8-bit and 16-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from lcmap.geodata.datasets import open_imagery
from lcmap.models.context import padded_input, valid_bbox
from lcmap.pipeline.prediction.strips import StripReader, context_box, window_into
from lcmap.pipeline.prediction.tiling import WindowGrid, output_grid

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


def test_window_into_normalises_and_feeds_invalid_pixels_as_the_band_mean(two_files):
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
    for j in range(wg.n_cols):
        c = wg.win_c0(j)
        if c + 16 <= 60:  # windows inside the extent: the normalised pixels themselves
            window_into(dst, wg, raw, ok, sr0, sc0, 0, j, mean, std)
            assert np.array_equal(dst, want_all[:, 0:16, c : c + 16])


def _grid(width: int, height: int):
    return output_grid("EPSG:32617", (X0, Y0 - height, X0 + width, Y0), (1.0, 1.0))


def test_context_box_of_a_window_over_an_edge_is_shifted_inward():
    """A 100 x 40 px image, tile 32 on a lattice starting 20 px before it: the first window
    (columns -20..12) holds 12 valid columns; the model sees the 32 columns from the image's edge."""
    grid = _grid(100, 40)
    wg = WindowGrid(32, 8, grid.height, grid.width, row0=-4, col0=-20)
    valid = np.ones((40, 100), bool)
    R, B = context_box(grid, wg, valid, 0, 0, 0, 0)  # rows -4..28, cols -20..12
    assert R == (0, 28, 0, 12)
    assert B == (0, 32, 0, 32)  # both axes: from the image's edge inward, tile long
    full = np.ones((40, 100), bool)
    wg0 = WindowGrid(32, 8, grid.height, grid.width)
    R, B = context_box(grid, wg0, full, 0, 0, 0, 1)  # a window wholly inside: itself
    assert R == B == (0, 32, 24, 56)
    R, B = context_box(grid, wg, valid, 0, 0, 1, 1)  # rows 20..52 of 40, cols 4..36
    assert R == (20, 40, 4, 36) and B == (8, 40, 4, 36)  # shifted up: the image's last 32 rows
    last = wg.n_cols - 1  # cols 76..108 of a 100 px image
    R, B = context_box(grid, wg, valid, 0, 0, 1, last)
    assert R == (20, 40, 76, 100) and B == (8, 40, 68, 100)


def test_context_box_of_a_small_image_is_the_image_and_empty_windows_are_none():
    grid = _grid(60, 50)
    wg = WindowGrid(64, 16, 200, 200, row0=-30, col0=-30)
    valid = np.zeros((200, 200), bool)  # the strip: output rows/cols 0..200 (a larger mosaic)
    valid[0:20, 0:24] = True  # a 24 x 20 px image in a corner of the window (-30..34)
    R, B = context_box(grid, wg, valid, 0, 0, 0, 0)
    assert R == B == (0, 20, 0, 24)  # the image itself: no empty area reaches the model
    assert context_box(grid, wg, valid, 0, 0, 2, 2) is None  # no valid pixel in that window
    valid[0:20, 30:34] = True  # a second image, 6 px apart, inside the same window
    R, B = context_box(grid, wg, valid, 0, 0, 0, 0)
    assert R == (0, 20, 0, 34) and B == (0, 20, 0, 60)  # reaches the window edge: extended, to the extent
    assert valid_bbox(valid) == (0, 20, 0, 34) and valid_bbox(np.zeros((3, 3), bool)) is None


def test_padded_input_mirrors_to_a_multiple():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    y = padded_input(x, 4)
    assert y.shape == (2, 4, 8)
    np.testing.assert_array_equal(y[:, :3, :5], x)
    np.testing.assert_array_equal(y[:, 3, :5], x[:, 1])  # row 3 mirrors row 1
    np.testing.assert_array_equal(y[:, :3, 5:], x[:, :, [3, 2, 1]])
    square = np.ones((1, 4, 4), np.float32)
    assert padded_input(square, 4) is square  # already a multiple: untouched


def test_a_warped_pixel_has_the_same_value_in_any_strip(tmp_path):
    """A file in another CRS (Web Mercator onto UTM) read within strips of different extents: each
    pixel the same (GDAL's approximate transformer, asked for other windows, picked other source
    pixels for thousands of pixels per strip before the warped files were read in fixed tiles)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (3, 1400, 1700), dtype=np.uint8)  # no two neighbours alike
    path = tmp_path / "merc.tif"
    x0, y0 = -9_350_000.0, 4_170_000.0  # EPSG:3857, about 84 W 35 N
    with rasterio.open(path, "w", driver="GTiff", width=1700, height=1400, count=3, dtype="uint8",
                       crs="EPSG:3857", transform=from_origin(x0, y0, 1.22, 1.22)) as dst:  # fmt: skip
        dst.write(data)
    utm = CRS.from_epsg(32616)
    bounds = transform_bounds("EPSG:3857", utm, x0, y0 - 1400 * 1.22, x0 + 1700 * 1.22, y0)
    ds = open_imagery([str(path)], crs=utm, res=(1.0, 1.0))
    x, y, _ = ds.bounds
    grid = output_grid(utm.to_wkt(), (float(x.start), float(y.start), float(x.stop), float(y.stop)), (1.0, 1.0))
    assert grid.width > 1000 and bounds[0] < bounds[2]
    reads = []
    for c0, c1 in [(0, grid.width), (300, 1500), (700, 1210), (1100, 1700)]:
        reader = StripReader(ds, grid)
        buf = np.zeros((3, 512, c1 - c0), reader.prepare())
        image, valid, r0, sc0 = reader.read(300, 812, c0, c1, buf)
        reads.append((image.copy(), valid.copy(), sc0))
    whole, whole_valid, w0 = reads[0]
    for image, valid, sc0 in reads[1:]:
        part = slice(sc0 - w0, sc0 - w0 + image.shape[2])
        assert np.array_equal(valid, whole_valid[:, part])
        assert np.array_equal(np.where(valid, image, 0), np.where(valid, whole[:, :, part], 0))

"""lcmap.geodata.io: input forms (file, folder, glob, .txt list, .vrt), checks, the overlap rule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasters import UTM17, fake_imagery, write_raster

from lcmap.errors import LcmapInputError
from lcmap.geodata.datasets import LabelRaster, pair_imagery_labels
from lcmap.geodata.io import check_raster_file, find_raster_files, imagery_valid, open_raster
from lcmap.geodata.label_mosaic import Grid, LabelMosaic
from lcmap.geodata.legends import get_legend
from lcmap.pipeline.analysis.evaluate import read_target_on_grid
from lcmap.pipeline.demo import _read_target

NLCD = get_legend("nlcd")
X0, Y0 = 500_000.0, 4_000_000.0  # upper-left corner of the 8 x 8 px, 1 m test grid (UTM 17N)
GRID = Grid.of(UTM17, from_origin(X0, Y0, 1.0, 1.0), 8, 8)


# --------------------------------------------------------------------------- the overlap rule
def _lonlat_label(path: Path, code: int, margin_m: float = 20.0) -> Path:
    """An EPSG:4326 raster holding ``code`` everywhere, covering the test grid with a margin."""
    to_ll = Transformer.from_crs(UTM17, "EPSG:4326", always_xy=True)
    xs = [X0 - margin_m, X0 + 8 + margin_m]
    ys = [Y0 - 8 - margin_m, Y0 + margin_m]
    lons, lats = to_ll.transform([xs[0], xs[1], xs[0], xs[1]], [ys[0], ys[0], ys[1], ys[1]])
    step = 1e-5
    w = int(np.ceil((max(lons) - min(lons)) / step))
    h = int(np.ceil((max(lats) - min(lats)) / step))
    return write_raster(
        path,
        np.full((h, w), code, np.uint8),
        crs="EPSG:4326",
        transform=from_origin(min(lons), max(lats), step, step),
        nodata=0,
    )


def _utm_label(path: Path) -> Path:
    """UTM, aligned with the test grid: 5 columns (x 0-5 m) of code 11, with a nodata pixel."""
    data = np.full((8, 5), 11, np.uint8)
    data[2, 1] = 0  # nodata: no label here
    return write_raster(path, data, transform=from_origin(X0, Y0, 1.0, 1.0), nodata=0)


def _expected(first_is_utm: bool) -> np.ndarray:
    """NLCD codes on the test grid, by hand: the UTM file covers columns 0-4 with 11 (water) except
    its nodata pixel (2, 1); the lon/lat file covers everything with 41 (forest)."""
    out = np.full((8, 8), 41)
    if first_is_utm:  # the UTM file wins where it holds a label
        out[:, :5] = 11
        out[2, 1] = 41  # its nodata pixel: the next file fills it
    return out


@pytest.mark.parametrize("utm_name", ["a_utm.tif", "z_utm.tif"])
def test_first_file_in_sorted_order_holding_a_label_wins(tmp_path: Path, utm_name: str) -> None:
    utm = _utm_label(tmp_path / utm_name)
    ll = _lonlat_label(tmp_path / "m_lonlat.tif", 41)
    first_is_utm = utm_name < "m_lonlat.tif"
    expected = _expected(first_is_utm)

    # the order the files are given in does not matter: sorted path order decides
    for given in ([utm, ll], [ll, utm]):
        with LabelMosaic(given, no_label_codes=NLCD.nodata) as mosaic:
            got = mosaic.read(GRID, fill_code=0)
        np.testing.assert_array_equal(got.codes, expected)
        assert got.has_label.all()
        which = np.where(expected == 11, mosaic.paths.index(str(utm)), mosaic.paths.index(str(ll)))
        np.testing.assert_array_equal(got.file_index, which)

    # every reader follows it: training labels, evaluate, the demo's quicklook
    img = fake_imagery(tmp_path / "img" / "img.tif", h=8, w=8)
    sample = pair_imagery_labels(img, [ll, utm], NLCD)[(slice(X0, X0 + 8, 1.0), slice(Y0 - 8, Y0, 1.0))]
    np.testing.assert_array_equal(sample["mask"].numpy(), NLCD.encode(expected))
    labels = LabelRaster([utm, ll], NLCD, crs=CRS.from_user_input(UTM17), res=1.0)
    raw = labels[(slice(X0, X0 + 8, 1.0), slice(Y0 - 8, Y0, 1.0))]["mask"].numpy()
    np.testing.assert_array_equal(raw, expected)

    target = read_target_on_grid([ll, utm], NLCD, UTM17, GRID.transform, 8, 8)
    np.testing.assert_array_equal(target, NLCD.index_to_target_lut()[NLCD.encode(expected)])

    # the quicklook reads one file: target codes 1..4 (water 1, tree canopy 2), 0 where no label
    quick = _read_target(utm if first_is_utm else ll, "nlcd", (X0, Y0 - 8, X0 + 8, Y0), (8, 8), crs=UTM17)
    own = np.full((8, 8), 2)
    if first_is_utm:
        own[:, :5] = 1
        own[2, 1] = 0
        own[:, 5:] = 0
    np.testing.assert_array_equal(quick, own)


def test_no_label_pixels_and_grid_windows(tmp_path: Path) -> None:
    utm = _utm_label(tmp_path / "u.tif")
    with LabelMosaic(utm, no_label_codes=NLCD.nodata) as mosaic:
        got = mosaic.read(GRID, fill_code=255)
        assert mosaic.file_nodata == [0]
        part = mosaic.read(GRID.window(rasterio.windows.Window(3, 1, 4, 2)), fill_code=255)
    has = np.zeros((8, 8), bool)
    has[:, :5] = True
    has[2, 1] = False
    np.testing.assert_array_equal(got.has_label, has)
    np.testing.assert_array_equal(got.codes, np.where(has, 11, 255))
    np.testing.assert_array_equal(got.file_index, np.where(has, 0, -1))
    np.testing.assert_array_equal(part.codes, got.codes[1:3, 3:7])
    assert GRID.bounds == (X0, Y0 - 8, X0 + 8, Y0)


def test_imagery_valid_numpy_and_torch() -> None:
    import torch

    image = np.ones((3, 2, 2), np.float32)
    image[:, 0, 0] = 0
    image[0, 1, 1] = 0  # one band only: still valid
    expected = np.array([[False, True], [True, True]])
    np.testing.assert_array_equal(imagery_valid(image, 0), expected)
    np.testing.assert_array_equal(imagery_valid(torch.from_numpy(image)[None], 0).numpy()[0], expected)


@pytest.mark.parametrize("nodata", [float("nan"), -9999.0, 0.0])
def test_nan_and_inf_imagery_is_nodata_numpy_and_torch(nodata: float) -> None:
    """NaN or +-inf in any band makes the pixel nodata, whatever the files' nodata value (NaN, as
    float imagery writes it, never equals itself); uint8 imagery keeps the plain rule."""
    import torch

    image = np.full((3, 2, 3), 7.0, np.float32)
    image[:, 0, 0] = np.nan  # every band NaN (float imagery's nodata)
    image[1, 0, 1] = np.nan  # one band NaN
    image[2, 1, 0] = np.inf
    image[0, 1, 1] = -np.inf
    expected = np.array([[False, False, True], [False, False, True]])
    np.testing.assert_array_equal(imagery_valid(image, nodata), expected)
    np.testing.assert_array_equal(imagery_valid(torch.from_numpy(image)[None], nodata).numpy()[0], expected)
    as_int = np.ones((3, 2, 2), np.uint8)
    as_int[:, 1, 1] = 0
    np.testing.assert_array_equal(imagery_valid(as_int, 0), [[True, True], [True, False]])


# --------------------------------------------------------------------------- input forms
@pytest.fixture
def tiles(tmp_path: Path) -> list[Path]:
    return [
        fake_imagery(tmp_path / "tiles" / "a.tif", h=8, w=8),
        fake_imagery(tmp_path / "tiles" / "b.tif", h=8, w=8, x0=X0 + 8),
        fake_imagery(tmp_path / "tiles" / "sub" / "c.tif", h=8, w=8, x0=X0 + 16),
    ]


def test_file_folder_and_glob(tiles: list[Path], tmp_path: Path) -> None:
    (tmp_path / "tiles" / "notes.md").write_text("not a raster")
    all_files = sorted(map(str, tiles))
    assert find_raster_files(tiles[1], "imagery") == [str(tiles[1])]
    assert find_raster_files(tmp_path / "tiles", "imagery") == all_files  # recursive, rasters only
    assert find_raster_files(f"{tmp_path}/tiles/*.tif", "imagery") == all_files[:2]
    assert find_raster_files(f"{tmp_path}/tiles/**/*.tif", "imagery") == all_files
    # mixed and duplicated inputs: sorted, once each
    assert find_raster_files([tiles[2], tmp_path / "tiles", tiles[0]], "imagery") == all_files


def test_txt_list(tiles: list[Path], tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "tiles.txt").write_text(
        "# imagery for the test\n\n"
        f"../tiles/b.tif\n"  # relative to the list's folder
        f"  {tiles[0]}  \n"  # absolute, with spaces around
        "../tiles/sub/*.tif\n"
    )
    cwd = os.getcwd()
    os.chdir(tmp_path / "tiles")  # relative entries do not depend on the working directory
    try:
        assert find_raster_files(lists / "tiles.txt", "imagery") == sorted(map(str, tiles))
    finally:
        os.chdir(cwd)
    (lists / "bad.txt").write_text("../tiles/a.tif\n../tiles/missing.tif\n")
    with pytest.raises(LcmapInputError, match=r"bad\.txt, line 2: .*missing\.tif does not exist"):
        find_raster_files(lists / "bad.txt", "imagery")
    (lists / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(LcmapInputError, match=r"empty\.txt names no file"):
        find_raster_files(lists / "empty.txt", "imagery")
    (lists / "loop.txt").write_text("loop.txt\n")
    with pytest.raises(LcmapInputError, match="includes itself"):
        find_raster_files(lists / "loop.txt", "imagery")


def _write_vrt(path: Path, sources: list[Path], width: int, height: int) -> Path:
    """A one-band VRT mosaic of 8 x 8 px GeoTIFFs laid side by side (x offsets 0, 8, ...)."""
    items = "".join(
        f'<SimpleSource><SourceFilename relativeToVRT="0">{s}</SourceFilename><SourceBand>1</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="8" ySize="8"/>'
        f'<DstRect xOff="{8 * i}" yOff="0" xSize="8" ySize="8"/></SimpleSource>'
        for i, s in enumerate(sources)
    )
    with rasterio.open(sources[0]) as src:
        wkt = src.crs.to_wkt().replace('"', "&quot;")
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{wkt}</SRS>'
        f"<GeoTransform>{X0}, 1, 0, {Y0}, 0, -1</GeoTransform>"
        f'<VRTRasterBand dataType="Byte" band="1">{items}</VRTRasterBand></VRTDataset>'
    )
    return path


def test_vrt_is_one_raster_and_its_sources_are_checked(tiles: list[Path], tmp_path: Path) -> None:
    vrt = _write_vrt(tmp_path / "mosaic.vrt", tiles[:2], 16, 8)
    assert find_raster_files(vrt, "imagery") == [str(vrt)]
    prof = check_raster_file(vrt, "imagery")
    assert prof["bounds"] == (X0, Y0 - 8, X0 + 16, Y0)
    with open_raster(vrt, "imagery") as src, rasterio.open(tiles[1]) as b:
        np.testing.assert_array_equal(src.read(1)[:, 8:], b.read(1))
    broken = _write_vrt(tmp_path / "broken.vrt", [tiles[0], tmp_path / "gone.tif"], 16, 8)
    with pytest.raises(LcmapInputError, match=r"broken\.vrt.*gone\.tif"):
        check_raster_file(broken, "imagery")


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LcmapInputError, match=r"label path .*nope\.tif does not exist"):
        find_raster_files(tmp_path / "nope.tif", "label")
    with pytest.raises(LcmapInputError, match="matched no file"):
        find_raster_files(f"{tmp_path}/*.tif", "label")
    (tmp_path / "doc.md").write_text("x")
    with pytest.raises(LcmapInputError, match="matched no raster file"):
        find_raster_files(f"{tmp_path}/*.md", "label")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LcmapInputError, match="no raster files"):
        find_raster_files(tmp_path / "empty", "label")
    with pytest.raises(LcmapInputError, match="no label files given"):
        find_raster_files([], "label")
    good = fake_imagery(tmp_path / "good.tif")
    data = good.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    write_raster(tmp_path / "nocrs.tif", np.ones((1, 8, 8), np.uint8), crs=None)
    for name, pattern in (
        ("cut.tif", "corrupt or truncated"),
        ("junk.tif", "not a readable raster"),
        ("nocrs.tif", "has no CRS"),
    ):
        with pytest.raises(LcmapInputError, match=rf"{name.replace('.', '[.]')}.*{pattern}"):
            LabelMosaic(tmp_path / name)
        with pytest.raises(LcmapInputError, match=pattern):
            read_target_on_grid(tmp_path / name, NLCD, UTM17, GRID.transform, 8, 8)

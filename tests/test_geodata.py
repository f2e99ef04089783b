"""Geodata layer: legends, AOI, imagery/label pairing and alignment, sampling, bad input.

Runs under torchgeo 0.8 (Python 3.11) and 0.10 (Python 3.12): `.ci/run` runs this file on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin
from rasters import UTM17, fake_imagery, write_raster

from lcmap.compat import query_bounds, random_patch_sampler
from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import aoi_from_bbox, aoi_from_file, rasterize_aoi, resolve_aoi
from lcmap.geodata.datasets import (
    LabelledImagery,
    open_imagery,
    open_labels,
    pair_imagery_labels,
    read_imagery,
)
from lcmap.geodata.legends import (
    BUILTIN_LEGENDS,
    DEFAULT_TARGET,
    IGNORE_INDEX,
    Legend,
    UnknownLabelError,
    get_legend,
)
from lcmap.geodata.normalization import compute_band_stats
from lcmap.geodata.sample import sample_paths

DATA = Path(__file__).parent / "data"
NLCD = get_legend("nlcd")


# --------------------------------------------------------------------------- legends
def test_builtin_legends_map_to_targets() -> None:
    for name, legend in BUILTIN_LEGENDS.items():
        assert len(legend) > 0, name
        lut = legend.index_to_target_lut()
        targets = {int(v) for v in lut[: len(legend)] if v != IGNORE_INDEX}
        assert targets <= set(range(len(DEFAULT_TARGET))), name
    assert len(NLCD) == 16
    # convention from the data README: NLCD 41/42/43/90 tree, 21-24 built-up, 11 water
    t = NLCD.code_to_target_lut()
    names = DEFAULT_TARGET.names
    assert [names[t[c]] for c in (11, 21, 24, 41, 90, 81, 95)] == [
        "water",
        "built-up",
        "built-up",
        "tree canopy",
        "tree canopy",
        "low vegetation",
        "low vegetation",
    ]
    assert t[0] == IGNORE_INDEX and t[12] == IGNORE_INDEX  # nodata, untargeted ice


def test_encode_nodata_and_unknown_codes() -> None:
    codes = np.array([[11, 41], [0, 95]], dtype=np.uint8)
    idx = NLCD.encode(codes, source="x.tif")
    assert idx.tolist() == [[0, NLCD.codes.index(41)], [IGNORE_INDEX, 15]]
    with pytest.raises(UnknownLabelError) as err:
        NLCD.encode(np.array([11, 7, 200, 7]), source="labels/nlcd.tif")
    msg = str(err.value)
    assert "7, 200" in msg and "labels/nlcd.tif" in msg and "nlcd" in msg


def test_real_legend_rasters_encode_without_unknown_codes() -> None:
    with rasterio.open(DATA / "m_3907833_nw_17_1_nlcd.tif") as src:
        idx = NLCD.encode(src.read(1), source=src.name)
    assert idx.max() < len(NLCD)
    with rasterio.open(DATA / "m_3907833_nw_17_1_lc.tif") as src:
        idx = get_legend("chesapeake").encode(src.read(1), source=src.name)
    assert set(np.unique(idx)) == set(range(6))


def test_user_yaml_legend_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nnodata: [0, 99]\nclasses:\n"
        "  - {code: 5, name: Lake, color: '#0000ff', target: water}\n"
        "  - {code: 7, name: Town, color: '#ff0000', target: built-up}\n"
        "  - {code: 9, name: Cloud, color: '#ffffff', target: null}\n"
    )
    legend = get_legend(path)
    assert legend.codes == [5, 7, 9] and legend.nodata == (0, 99)
    assert legend.encode(np.array([5, 99, 9])).tolist() == [0, IGNORE_INDEX, 2]
    legend.to_yaml(tmp_path / "again.yaml")
    assert Legend.from_yaml(tmp_path / "again.yaml") == legend
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  - {code: 1, name: A, color: '#000000', target: moon}\n")
    with pytest.raises(LcmapInputError, match="not a valid legend"):
        get_legend(bad)
    with pytest.raises(LcmapInputError, match="unknown legend"):
        get_legend("nope")


# --------------------------------------------------------------------------- AOI
def test_aoi_file_in_other_crs_and_multipolygon(tmp_path: Path) -> None:
    to_ll = Transformer.from_crs(UTM17, "EPSG:4326", always_xy=True)
    squares = [shapely.box(500_010, 3_999_950, 500_030, 3_999_970), shapely.box(500_040, 3_999_940, 500_060, 3_999_960)]
    feats = []
    for sq in squares:
        ring = [list(to_ll.transform(x, y)) for x, y in sq.exterior.coords]
        feats.append({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    aoi = aoi_from_file(path)
    assert aoi.crs.to_epsg() == 4326
    geom = aoi.to_crs(UTM17)
    assert geom.geom_type == "MultiPolygon"
    assert abs(geom.area - 800) < 1.0
    mask = rasterize_aoi(geom, from_origin(500_000, 4_000_000, 1, 1), (64, 64))
    assert mask.sum() == 800 and mask[40, 15] and not mask[0, 0]


def test_bbox_aoi_and_errors(tmp_path: Path) -> None:
    aoi = resolve_aoi(None, (500_000, 3_999_936, 500_064, 4_000_000), "EPSG:32617")
    assert aoi.geometry.area == 64 * 64
    with pytest.raises(LcmapInputError, match="not both"):
        resolve_aoi(tmp_path / "a.geojson", (0, 0, 1, 1))
    with pytest.raises(LcmapInputError, match="E > W"):
        aoi_from_bbox(1, 0, 0, 1)
    with pytest.raises(LcmapInputError, match="does not exist"):
        aoi_from_file(tmp_path / "missing.geojson")
    with pytest.raises(LcmapInputError, match="does not overlap"):
        aoi_from_bbox(10, 10, 11, 11).check_overlap((500_000, 3_999_936, 500_064, 4_000_000), UTM17, "the imagery")


# --------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("label_crs", ["EPSG:4326", "EPSG:5070"])
def test_label_in_other_crs_lands_on_right_1m_pixels(tmp_path: Path, label_crs: str) -> None:
    """A label raster in another CRS with a known pattern (quadrants split at a known line in the
    label CRS) lands, after pairing, on the 1 m pixels whose centres lie on each side."""
    img = fake_imagery(tmp_path / "img.tif", h=96, w=96, x0=500_000, y0=4_000_000)
    to_lbl = Transformer.from_crs(UTM17, label_crs, always_xy=True)
    cx, cy = to_lbl.transform(500_048, 3_999_952)  # imagery centre in label CRS
    res = 2e-5 if label_crs == "EPSG:4326" else 30.0
    # label grid whose pixel edge falls exactly on (cx, cy); 64 pixels either way
    x0, y0 = cx - 64 * res, cy + 64 * res
    rows, cols = np.mgrid[0:128, 0:128]
    codes = np.where(cols < 64, np.where(rows < 64, 11, 21), np.where(rows < 64, 41, 81)).astype(np.uint8)
    write_raster(tmp_path / "lbl.tif", codes, crs=label_crs, transform=from_origin(x0, y0, res, res), nodata=0)

    ds = pair_imagery_labels(img, tmp_path / "lbl.tif", NLCD)
    sample = ds[(slice(500_000, 500_096, 1.0), slice(3_999_904, 4_000_000, 1.0))]
    mask = sample["mask"].numpy()
    assert mask.shape == (96, 96) and sample["image"].shape == (4, 96, 96)

    # expected class from each 1 m pixel centre, in the label CRS
    px, py = np.meshgrid(500_000 + np.arange(96) + 0.5, 4_000_000 - np.arange(96) - 0.5)
    lx, ly = to_lbl.transform(px, py)
    expected = np.where(lx < cx, np.where(ly > cy, 11, 21), np.where(ly > cy, 41, 81))
    expected = NLCD.encode(expected)
    # metres from each pixel centre to the two class edges (in UTM)
    edge_m = np.minimum(
        np.abs(px - px[np.unravel_index(np.argmin(np.abs(lx - cx)), lx.shape)]),
        np.abs(py - py[np.unravel_index(np.argmin(np.abs(ly - cy)), ly.shape)]),
    )
    far = edge_m > 1.5
    assert far.sum() > 0.9 * far.size
    assert (mask[far] == expected[far]).all()
    assert (mask == expected).mean() > 0.98


def test_real_naip_in_own_utm_zone_and_resolution() -> None:
    for name, epsg in (("m_3211605_ne_11_060_20200415.tif", 26911), ("m_4208701_ne_16_060_20200902.tif", 26916)):
        ds = open_imagery(DATA / name)
        assert ds.crs.to_epsg() == epsg and ds.count == 4
        with rasterio.open(DATA / name) as src:
            assert ds.res == pytest.approx(src.res) and ds.res == pytest.approx((0.6, 0.6), abs=0.002)
            rx, ry = src.res
            x0, y1 = src.bounds.left, src.bounds.top
            image, valid = read_imagery(ds, x0, y1 - 50 * ry, x0 + 100 * rx, y1)
            raw = src.read(window=rasterio.windows.Window(0, 0, 100, 50))
        assert image.shape == (4, 50, 100) and valid.all()
        assert np.array_equal(image, raw.astype(np.float32))


def test_real_chesapeake_tile_pairs_nlcd_and_reference() -> None:
    imagery = open_imagery(DATA / "m_3907833_nw_17_1_naip-new.tif")
    ds = LabelledImagery(imagery, open_labels(DATA / "m_3907833_nw_17_1_nlcd.tif", NLCD))
    x, y, _ = imagery.bounds
    rx, ry = imagery.res
    sample = ds[(slice(x.start, x.start + 64 * rx, rx), slice(y.stop - 64 * ry, y.stop, ry))]
    with rasterio.open(DATA / "m_3907833_nw_17_1_nlcd.tif") as src:
        raw = src.read(1)[:64, :64]
    assert np.array_equal(sample["mask"].numpy(), NLCD.encode(raw).astype(np.int64))


@pytest.mark.parametrize(("bands", "dtype"), [(3, np.uint8), (4, np.uint16)])
def test_band_counts_dtypes_and_nodata(tmp_path: Path, bands: int, dtype) -> None:
    img = fake_imagery(tmp_path / "img.tif", bands=bands, dtype=dtype, nodata=0)
    with rasterio.open(img, "r+") as dst:  # a nodata corner
        data = dst.read()
        data[:, :8, :8] = 0
        dst.write(data)
    lbl = write_raster(tmp_path / "lbl.tif", np.full((64, 64), 41, np.uint8), nodata=0)
    ds = pair_imagery_labels(img, lbl, NLCD)
    sample = ds[(slice(500_000, 500_064, 1.0), slice(3_999_936, 4_000_000, 1.0))]
    assert sample["image"].shape == (bands, 64, 64)
    mask = sample["mask"].numpy()
    assert (mask[:8, :8] == IGNORE_INDEX).all() and (mask[8:, 8:] == NLCD.codes.index(41)).all()
    stats = compute_band_stats(ds.imagery)
    assert len(stats.mean) == bands and all(s > 0 for s in stats.std)


def test_labels_put_on_the_imagery_grid_print_nothing(tmp_path: Path, capfd) -> None:
    """TorchGeo prints "Converting LabelRaster res from (30.0, 30.0) to (1.0, 1.0)" (and CRS)
    when the labels go onto the imagery's grid: lcmap drops those lines, nothing else."""
    from lcmap.geodata import datasets

    img = fake_imagery(tmp_path / "img.tif", h=90, w=90)
    lbl = write_raster(
        tmp_path / "lbl.tif", np.full((3, 3), 41, np.uint8), crs="EPSG:5070", transform=from_origin(1e6, 1.6e6, 30, 30)
    )
    lbl_utm = write_raster(tmp_path / "utm.tif", np.full((3, 3), 41, np.uint8), transform=from_origin(5e5, 4e6, 30, 30))
    imagery = open_imagery(img)
    for path in (lbl, lbl_utm):
        labels = open_labels(path, NLCD)
        assert labels.res == (30.0, 30.0)
        capfd.readouterr()
        try:
            LabelledImagery(imagery, labels)
        except LcmapInputError:  # the EPSG:5070 square lies elsewhere: only the notice matters here
            pass
        out, err = capfd.readouterr()
        assert "Converting" not in out + err and out == "" and err == ""
        assert labels.res == imagery.res and labels.crs == imagery.crs
    with datasets._without_grid_notices():  # other lines still reach stdout
        print("Converting LabelRaster res from (30.0, 30.0) to (1.0, 1.0)")
        print("something else")
    assert capfd.readouterr().out == "something else\n"


def test_nan_float_imagery_is_nodata_for_labels_statistics_and_batches(tmp_path: Path) -> None:
    """Float imagery with NaN as nodata (and a stray +inf): those pixels are ignored by the labels,
    left out of the normalisation statistics and fed to the network as the band mean (0), never NaN."""
    import torch

    from lcmap.pipeline.training.datamodule import LandCoverDataModule

    rng = np.random.default_rng(0)
    data = rng.uniform(10, 200, (3, 64, 64)).astype(np.float32)
    data[:, :8, :8] = np.nan
    data[1, 20, 30] = np.nan  # one band only
    data[2, 40, 50] = np.inf
    img = write_raster(tmp_path / "img.tif", data, nodata=float("nan"))
    lbl = write_raster(tmp_path / "lbl.tif", np.full((64, 64), 41, np.uint8), nodata=0)
    ds = pair_imagery_labels(img, lbl, NLCD)
    sample = ds[(slice(500_000, 500_064, 1.0), slice(3_999_936, 4_000_000, 1.0))]
    bad = ~np.isfinite(data).all(axis=0)
    assert bad.sum() == 66
    mask = sample["mask"].numpy()
    assert (mask[bad] == IGNORE_INDEX).all() and (mask[~bad] == NLCD.codes.index(41)).all()
    stats = compute_band_stats(ds.imagery)
    good = data[:, ~bad].astype(np.float64)
    np.testing.assert_allclose(stats.mean, good.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats.std, good.std(axis=1), rtol=1e-5)
    assert np.isfinite([*stats.low, *stats.high]).all()
    dm = LandCoverDataModule(
        ds.imagery, ds.labels, None, 64, 1, 1, stats.mean, stats.std, augment=False, nodata=ds.imagery.nodata
    )
    batch = dm.on_after_batch_transfer({"image": sample["image"][None], "mask": sample["mask"][None]}, 0)
    x = batch["image"][0]
    assert torch.isfinite(x).all() and (x[:, torch.from_numpy(bad)] == 0).all()


# --------------------------------------------------------------------------- sampling in the AOI
def test_sampler_draws_inside_multipolygon_aoi_and_masks_outside() -> None:
    paths = sample_paths()
    imagery = open_imagery(paths["imagery"])
    aoi = aoi_from_file(paths["aoi_train"]).to_crs(imagery.crs)
    ds = LabelledImagery(imagery, open_labels(paths["labels"], NLCD), aoi=aoi)
    sampler = random_patch_sampler(ds, 64, 24, roi=aoi, seed=3)
    queries = list(sampler)
    assert len(queries) == 24
    held_out = aoi_from_file(paths["aoi_heldout"]).to_crs(imagery.crs)
    for q in queries:
        xmin, ymin, xmax, ymax = query_bounds(q)
        centre = shapely.Point((xmin + xmax) / 2, (ymin + ymax) / 2)
        assert aoi.contains(centre) and not held_out.contains(centre)
    sample = ds[queries[0]]
    assert sample["image"].shape == (4, 64, 64) and sample["mask"].shape == (64, 64)
    # a window straddling a patch edge: pixels outside the AOI are ignored
    x0, y0, x1, y1 = aoi.geoms[0].bounds if hasattr(aoi, "geoms") else aoi.bounds
    edge = ds[(slice(x1 - 32, x1 + 32, 1.0), slice(y1 - 64, y1, 1.0))]
    assert (edge["mask"].numpy()[:, 32:] == IGNORE_INDEX).all()
    assert (edge["mask"].numpy()[:, :32] != IGNORE_INDEX).mean() > 0.9


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    img = fake_imagery(tmp_path / "img.tif")
    with pytest.raises(LcmapInputError, match="does not exist"):
        open_imagery(tmp_path / "nope.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LcmapInputError, match="no raster files"):
        open_imagery(tmp_path / "empty")
    # truncated GeoTIFF
    data = img.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(LcmapInputError, match=r"cut\.tif.*corrupt or truncated"):
        open_imagery(tmp_path / "cut.tif")
    # garbage
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(LcmapInputError, match="junk.tif"):
        open_imagery(tmp_path / "junk.tif")
    # no CRS
    write_raster(tmp_path / "nocrs.tif", np.ones((1, 8, 8), np.uint8), crs=None)
    with pytest.raises(LcmapInputError, match="has no CRS"):
        open_imagery(tmp_path / "nocrs.tif")
    # imagery and labels do not overlap
    far = write_raster(
        tmp_path / "far.tif", np.full((8, 8), 41, np.uint8), transform=from_origin(600_000, 4_000_000, 30, 30)
    )
    with pytest.raises(LcmapInputError, match="do not overlap"):
        pair_imagery_labels(img, far, NLCD)
    # labels outside the legend
    bad = write_raster(tmp_path / "bad.tif", np.full((64, 64), 7, np.uint8))
    ds = pair_imagery_labels(img, bad, NLCD)
    with pytest.raises(UnknownLabelError, match=r"bad\.tif"):
        ds[(slice(500_000, 500_032, 1.0), slice(3_999_968, 4_000_000, 1.0))]

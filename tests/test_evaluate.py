"""lcmap evaluate: metrics from confusion matrices and scoring maps against references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import aoi_from_bbox
from lcmap.geodata.legends import IGNORE_INDEX, UnknownLabelError, get_legend
from lcmap.pipeline.analysis.evaluate import LEGEND_TAG, evaluate_map, read_target_on_grid
from lcmap.pipeline.metrics import confusion_matrix, scores_from_confusion

UTM = "EPSG:32617"
X0, Y0 = 500_000.0, 4_000_000.0  # map origin (upper left), 1 m pixels
NAMES = ["water", "tree canopy", "low vegetation", "built-up"]


def write_tif(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM,
    transform=None,
    nodata: float | None = 0,
    tags: dict | None = None,
) -> Path:
    """A one-band GeoTIFF of ``data`` (default grid: origin X0, Y0 at 1 m)."""
    data = np.asarray(data)
    transform = transform or from_origin(X0, Y0, 1.0, 1.0)
    profile = dict(
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=data.dtype.name,
        transform=transform,
        nodata=nodata,
    )
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        if tags:
            dst.update_tags(**tags)
    return path


def cm_of(truth_codes: np.ndarray, pred_codes: np.ndarray) -> np.ndarray:
    """Confusion matrix of 4-class target codes (1-4; 0 = nodata), computed the slow way."""
    cm = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(np.ravel(truth_codes), np.ravel(pred_codes), strict=False):
        if t and p:
            cm[t - 1, p - 1] += 1
    return cm


# ------------------------------------------------------------------------------------- metrics
def test_confusion_matrix_hand_computed_ignores_ignore_index():
    truth = np.array([0, 0, 1, 1, 2, IGNORE_INDEX, 3, 2], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1, 2, 0, IGNORE_INDEX, 0], dtype=np.uint8)
    cm = confusion_matrix(truth, pred, 4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert confusion_matrix(truth.reshape(2, 4), pred.reshape(2, 4), 4).sum() == 6
    with pytest.raises(ValueError):
        confusion_matrix(np.array([5]), np.array([0]), 4)


def test_scores_hand_computed_with_absent_classes():
    # class 2 is absent from the reference but predicted twice; class 3 is absent from both
    cm = np.array([[4, 1, 1, 0], [1, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = scores_from_confusion(cm, NAMES)
    assert s["oa"] == pytest.approx(7 / 11)
    pe = (6 * 5 + 5 * 4) / 121
    assert s["kappa"] == pytest.approx((7 / 11 - pe) / (1 - pe))
    assert s["kappa"] == pytest.approx(27 / 71)
    pc = s["per_class"]
    assert pc["water"] == pytest.approx(
        {"iou": 4 / 7, "precision": 4 / 5, "recall": 4 / 6, "f1": 8 / 11, "support_px": 6}
    )
    assert pc["tree canopy"]["iou"] == pytest.approx(0.5)
    assert pc["low vegetation"] == {"iou": 0.0, "precision": 0.0, "recall": None, "f1": 0.0, "support_px": 0}
    assert pc["built-up"] == {"iou": None, "precision": None, "recall": None, "f1": None, "support_px": 0}
    # mIoU over classes present in reference or prediction: built-up left out, low veg counts 0
    assert s["miou"] == pytest.approx((4 / 7 + 0.5 + 0.0) / 3)
    # over the reference's classes only (water, tree canopy): the false low-veg predictions still
    # cost through the recall of water and tree canopy, but low veg's IoU of 0 is not averaged in
    assert s["miou_reference_classes"] == pytest.approx((4 / 7 + 0.5) / 2)
    assert s["confusion"] == cm.tolist() and s["class_names"] == NAMES
    json.dumps(s, allow_nan=False)


def test_scores_degenerate_cases_are_none_not_nan():
    one = scores_from_confusion(np.array([[5, 0], [0, 0]]), ["a", "b"])
    assert one["oa"] == 1.0 and one["miou"] == 1.0 and one["kappa"] is None
    empty = scores_from_confusion(np.zeros((2, 2), dtype=int), ["a", "b"])
    assert empty["oa"] is None and empty["miou"] is None and empty["kappa"] is None
    assert empty["miou_reference_classes"] is None and one["miou_reference_classes"] == 1.0
    json.dumps([one, empty], allow_nan=False)


# ------------------------------------------------------------------------------------- fixtures
MAP = np.array(
    [
        [1, 1, 2, 2, 3, 3, 4, 4],
        [1, 1, 2, 2, 3, 3, 4, 4],
        [1, 2, 2, 2, 3, 3, 4, 0],
        [1, 1, 2, 3, 3, 3, 4, 0],
        [2, 2, 3, 3, 4, 4, 1, 1],
        [2, 2, 3, 3, 4, 4, 1, 1],
        [3, 3, 4, 4, 1, 1, 2, 2],
        [3, 3, 4, 4, 1, 1, 2, 2],
    ],
    dtype=np.uint8,
)

# reference at 2 m, 4-class codes (legend "4class"): each pixel covers 2 x 2 map pixels
REF2 = np.array(
    [
        [1, 2, 3, 4],
        [1, 2, 3, 0],
        [2, 3, 4, 1],
        [3, 4, 1, 2],
    ],
    dtype=np.uint8,
)


@pytest.fixture
def map_tif(tmp_path):
    return write_tif(tmp_path / "map.tif", MAP)


@pytest.fixture
def ref2_tif(tmp_path):
    return write_tif(tmp_path / "ref2m.tif", REF2, transform=from_origin(X0, Y0, 2.0, 2.0))


def ref_on_map_grid() -> np.ndarray:
    return np.kron(REF2, np.ones((2, 2), dtype=np.uint8))


# ------------------------------------------------------------------------------------- grids
def test_reference_at_2m_lands_on_map_grid(map_tif, ref2_tif, tmp_path):
    with rasterio.open(map_tif) as src:
        got = read_target_on_grid([ref2_tif], get_legend("4class"), src.crs, src.transform, src.width, src.height)
    expected = ref_on_map_grid().astype(np.int64) - 1
    expected[expected < 0] = IGNORE_INDEX
    np.testing.assert_array_equal(got, expected)

    m = evaluate_map(map_tif, ref2_tif, "4class", tmp_path / "report", progress=False)
    cm = cm_of(ref_on_map_grid(), MAP)
    assert m["confusion"] == cm.tolist()
    assert m["pixels"] == int(cm.sum()) == 64 - 4  # ref nodata: 4 px (rows 2-3, cols 6-7), map's 2 among them
    assert m["oa"] == pytest.approx(np.trace(cm) / cm.sum())


def _lonlat_reference(pattern: np.ndarray, step_deg: float = 2e-6) -> tuple[np.ndarray, object]:
    """A fine EPSG:4326 raster whose pixels take the code of the map pixel holding their centre."""
    h, w = pattern.shape
    xs = [X0 - 2, X0 + w + 2, X0 - 2, X0 + w + 2]
    ys = [Y0 + 2, Y0 + 2, Y0 - h - 2, Y0 - h - 2]
    lons, lats = warp_transform(UTM, "EPSG:4326", xs, ys)
    west, east, south, north = min(lons), max(lons), min(lats), max(lats)
    width, height = math.ceil((east - west) / step_deg), math.ceil((north - south) / step_deg)
    transform = from_origin(west, north, step_deg, step_deg)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    lon = west + cols * step_deg
    lat = north - rows * step_deg
    ux, uy = warp_transform("EPSG:4326", UTM, lon.ravel().tolist(), lat.ravel().tolist())
    mc = np.floor(np.asarray(ux) - X0).astype(int).reshape(lon.shape)
    mr = np.floor(Y0 - np.asarray(uy)).astype(int).reshape(lon.shape)
    inside = (mc >= 0) & (mc < w) & (mr >= 0) & (mr < h)
    data = np.zeros(lon.shape, dtype=np.uint8)
    data[inside] = pattern[mr[inside], mc[inside]]
    return data, transform


def test_reference_in_lonlat_lands_on_utm_map_grid(map_tif, tmp_path):
    truth = np.roll(MAP, 1, axis=1)
    truth[truth == 0] = 2
    truth[0, 0] = 0  # a nodata pixel in the reference
    data, transform = _lonlat_reference(truth)
    ref = write_tif(tmp_path / "ref_ll.tif", data, crs="EPSG:4326", transform=transform, nodata=0)
    with rasterio.open(map_tif) as src:
        got = read_target_on_grid(ref, get_legend("4class"), src.crs, src.transform, src.width, src.height)
    expected = truth.astype(np.int64) - 1
    expected[expected < 0] = IGNORE_INDEX
    np.testing.assert_array_equal(got, expected)
    m = evaluate_map(map_tif, ref, "4class", tmp_path / "r", progress=False)
    assert m["confusion"] == cm_of(truth, MAP).tolist()


def test_reference_legend_and_mosaic_of_two_files(map_tif, tmp_path):
    # chesapeake codes: 4 barren and 5/6 impervious -> built-up; 15 nodata. The left file has
    # 1 m x 2 m pixels over map cols 0-3; the right one (1 m) covers cols 3-7: where both cover,
    # the first file wins unless it holds nodata there.
    ches = np.array([[1, 2, 3, 4], [5, 6, 1, 15], [2, 2, 3, 3], [4, 5, 6, 1]], dtype=np.uint8)
    left = write_tif(tmp_path / "left.tif", ches, transform=from_origin(X0, Y0, 1.0, 2.0), nodata=None)
    right = write_tif(
        tmp_path / "right.tif", np.full((8, 5), 3, np.uint8), transform=from_origin(X0 + 3, Y0, 1.0, 1.0), nodata=None
    )
    with rasterio.open(map_tif) as src:
        got = read_target_on_grid(
            [left, right], get_legend("chesapeake"), src.crs, src.transform, src.width, src.height
        )
    to_target = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    to_target[[1, 2, 3, 4, 5, 6]] = [0, 1, 2, 3, 3, 3]
    expected = np.full((8, 8), 2, dtype=np.uint8)
    expected[:, :4] = to_target[np.repeat(ches, 2, axis=0)]
    expected[2:4, 3] = 2  # left nodata (15), filled by the right file
    np.testing.assert_array_equal(got, expected)


def test_windowed_result_equals_single_window(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(37, 23)).astype(np.uint8)
    truth = rng.integers(0, 5, size=(19, 12)).astype(np.uint8)  # 2 m, a bit larger than the map
    mp = write_tif(tmp_path / "m.tif", pred)
    rf = write_tif(tmp_path / "r.tif", truth, transform=from_origin(X0 - 1, Y0 + 1, 2.0, 2.0))
    small = evaluate_map(mp, rf, "4class", tmp_path / "a", block_px=5, progress=False)
    big = evaluate_map(mp, rf, "4class", tmp_path / "b", block_px=4096, progress=True)
    assert small["confusion"] == big["confusion"]
    assert small["oa"] == big["oa"] and small["kappa"] == big["kappa"]
    # and both equal the confusion computed directly on the full arrays
    t = np.kron(truth, np.ones((2, 2), np.uint8))[1:38, 1:24]
    assert small["confusion"] == cm_of(t, pred).tolist()


# ------------------------------------------------------------------------------------- masks
def test_nodata_in_both_and_outside_reference_excluded(tmp_path):
    pred = np.full((4, 6), 2, dtype=np.uint8)
    pred[0, :] = 0  # map nodata
    truth = np.full((4, 4), 2, dtype=np.uint8)
    truth[:, 0] = 255  # reference nodata (dataset nodata value, not a legend code)
    mp = write_tif(tmp_path / "m.tif", pred)
    rf = write_tif(tmp_path / "r.tif", truth, nodata=255)  # covers map cols 0-3 only
    m = evaluate_map(mp, rf, "4class", tmp_path / "out", progress=False)
    assert m["pixels"] == 3 * 3
    assert m["confusion"][1][1] == 9 and m["oa"] == 1.0


def test_aoi_excludes_outside_pixels(map_tif, ref2_tif, tmp_path):
    aoi = aoi_from_bbox(X0, Y0 - 8, X0 + 4, Y0, crs=UTM)  # left half of the map
    m = evaluate_map(map_tif, ref2_tif, "4class", tmp_path / "o", aoi=aoi, progress=False)
    cm = cm_of(ref_on_map_grid()[:, :4], MAP[:, :4])
    assert m["confusion"] == cm.tolist() and m["pixels"] == 32
    assert m["aoi"] == aoi.source

    far = aoi_from_bbox(X0 + 1000, Y0 - 8, X0 + 1004, Y0, crs=UTM)
    with pytest.raises(LcmapInputError, match="does not overlap"):
        evaluate_map(map_tif, ref2_tif, "4class", tmp_path / "o2", aoi=far, progress=False)


# ------------------------------------------------------------------------------------- baseline
def test_baseline_scored_on_same_pixels_and_gain(map_tif, ref2_tif, tmp_path):
    # LR baseline at 4 m in NLCD codes: 41 forest (tree), 82 crops (low veg), 0 nodata
    lr = np.array([[41, 82], [0, 23]], dtype=np.uint8)
    base = write_tif(tmp_path / "lr.tif", lr, transform=from_origin(X0, Y0, 4.0, 4.0))
    m = evaluate_map(
        map_tif, ref2_tif, "4class", tmp_path / "out", baseline=base, baseline_legend="nlcd", progress=False
    )
    truth = ref_on_map_grid()
    lr_codes = np.kron(np.array([[2, 3], [0, 4]], np.uint8), np.ones((4, 4), np.uint8))
    common = (truth > 0) & (MAP > 0) & (lr_codes > 0)
    cm_map = cm_of(np.where(common, truth, 0), np.where(common, MAP, 0))
    cm_base = cm_of(np.where(common, truth, 0), np.where(common, lr_codes, 0))
    assert m["confusion"] == cm_map.tolist()
    assert m["baseline"]["confusion"] == cm_base.tolist()
    assert m["pixels"] == m["baseline"]["pixels"] == int(common.sum())
    for key in ("oa", "miou", "miou_reference_classes", "kappa"):
        assert m["gain"][key] == pytest.approx(m[key] - m["baseline"][key])
    assert m["baseline"]["legend"] == "nlcd"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "baseline" in report and "gain" in report
    # km² per class over the scored pixels (1 m² pixels): the confusion matrices' marginals
    areas = m["area_km2"]
    assert [areas["reference"][c] for c in NAMES] == pytest.approx((cm_map.sum(axis=1) / 1e6).tolist())
    assert [areas["map"][c] for c in NAMES] == pytest.approx((cm_map.sum(axis=0) / 1e6).tolist())
    assert [areas["baseline"][c] for c in NAMES] == pytest.approx((cm_base.sum(axis=0) / 1e6).tolist())
    assert "Area per class" in report

    with pytest.raises(LcmapInputError, match="baseline-legend"):
        evaluate_map(map_tif, ref2_tif, "4class", tmp_path / "x", baseline=base, progress=False)


def test_map_in_native_legend_read_through_its_tag(tmp_path, ref2_tif):
    nlcd = get_legend("nlcd")
    to_nlcd = np.array([0, 11, 41, 82, 23], dtype=np.uint8)
    mp = write_tif(tmp_path / "native.tif", to_nlcd[MAP], tags={LEGEND_TAG: json.dumps(nlcd.to_dict())})
    m = evaluate_map(mp, ref2_tif, "4class", tmp_path / "o", progress=False)
    assert m["confusion"] == cm_of(ref_on_map_grid(), MAP).tolist()
    assert m["map_legend"] == "nlcd"


# ------------------------------------------------------------------------------------- errors
def test_unknown_reference_code_is_reported_with_file(map_tif, tmp_path):
    bad = REF2.copy()
    bad[0, 0] = 9
    rf = write_tif(tmp_path / "bad_ref.tif", bad, transform=from_origin(X0, Y0, 2.0, 2.0))
    with pytest.raises(UnknownLabelError, match="9") as info:
        evaluate_map(map_tif, rf, "4class", tmp_path / "o", progress=False)
    assert "bad_ref.tif" in str(info.value)


def test_reference_not_overlapping_the_map(map_tif, tmp_path):
    rf = write_tif(tmp_path / "far.tif", REF2, transform=from_origin(X0 + 5000, Y0, 2.0, 2.0))
    with pytest.raises(LcmapInputError, match="does not overlap"):
        evaluate_map(map_tif, rf, "4class", tmp_path / "o", progress=False)


def test_missing_corrupt_no_crs_and_no_common_pixel(map_tif, ref2_tif, tmp_path):
    with pytest.raises(LcmapInputError, match="does not exist"):
        evaluate_map(map_tif, tmp_path / "nope.tif", "4class", tmp_path / "o", progress=False)
    with pytest.raises(LcmapInputError, match="does not exist"):
        evaluate_map(tmp_path / "nomap.tif", ref2_tif, "4class", tmp_path / "o", progress=False)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(LcmapInputError, match="not a readable raster"):
        evaluate_map(map_tif, junk, "4class", tmp_path / "o", progress=False)
    nocrs = write_tif(tmp_path / "nocrs.tif", REF2, crs=None)
    with pytest.raises(LcmapInputError, match="no CRS"):
        evaluate_map(map_tif, nocrs, "4class", tmp_path / "o", progress=False)
    empty = write_tif(tmp_path / "empty.tif", np.zeros((4, 4), np.uint8), transform=from_origin(X0, Y0, 2.0, 2.0))
    with pytest.raises(LcmapInputError, match="no pixel"):
        evaluate_map(map_tif, empty, "4class", tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------- outputs
def test_report_files_and_metrics_keys(map_tif, ref2_tif, tmp_path):
    out = tmp_path / "deep" / "report"
    m = evaluate_map(map_tif, [ref2_tif], "4class", out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "metrics.json", "report.md"]
    data = json.loads((out / "metrics.json").read_text())
    for key in ("oa", "miou", "kappa", "per_class", "confusion", "class_names", "pixels", "map", "reference"):
        assert key in data
    assert data == json.loads(json.dumps(m))
    assert data["class_names"] == NAMES and "baseline" not in data
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| water |" in report and "mIoU" in report

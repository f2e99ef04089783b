"""lcmap changes: from -> to change maps between an old product (other CRS/resolution) and a 1 m map."""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
from map_rasters import write_map_cog
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from shapely.geometry import box
from shapely.ops import transform as shapely_transform
from typer.testing import CliRunner

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import DEFAULT_TARGET, get_legend
from lcmap.geodata.sample import sample_paths
from lcmap.pipeline.analysis.changes import (
    CHANGES_TAG,
    decode_transition,
    map_changes,
    transition_code,
)
from lcmap.pipeline.analysis.zonal import pixel_area_m2_per_row
from lcmap.pipeline.prediction.cog import read_category_names

UTM, ALBERS = "EPSG:32617", "EPSG:5070"
X0, Y0 = 500_000.0, 4_000_000.0  # map origin (upper left), 1 m pixels
WATER, TREE, LOW, BUILT = 1, 2, 3, 4  # target codes in the map
NAMES = DEFAULT_TARGET.names


def write_old(path: Path, data: np.ndarray, crs: str, transform, nodata: int | None = 0) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data.astype(np.uint8), 1)
    return path


def old_grid_around(
    map_bounds: tuple[float, float, float, float], map_crs: str, crs: str, res: float, margin: int = 2
) -> tuple[rasterio.Affine, int, int]:
    """A ``res`` grid in ``crs`` covering ``map_bounds`` (in ``map_crs``) with ``margin`` pixels around."""
    left, bottom, right, top = transform_bounds(map_crs, crs, *map_bounds, densify_pts=21)
    ox = math.floor(left / res) * res - margin * res
    oy = math.ceil(top / res) * res + margin * res
    width = math.ceil((right - ox) / res) + margin
    height = math.ceil((oy - bottom) / res) + margin
    return from_origin(ox, oy, res, res), width, height


def read_csv(path: Path) -> dict[tuple[str, str], tuple[int, float]]:
    with open(path, newline="") as f:
        return {(r["from"], r["to"]): (int(r["pixels"]), float(r["km2"])) for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------ codes
def test_transition_codes_are_one_based_and_invertible():
    n = 4
    codes = [transition_code(f, t, n) for f in range(n) for t in range(n)]
    assert codes == list(range(1, n * n + 1))  # 0 stays nodata
    assert transition_code(1, 3, n) == 8  # tree canopy -> built-up
    for code in codes:
        assert transition_code(*decode_transition(code, n), n) == code
    with pytest.raises(ValueError):
        decode_transition(0, n)


# ------------------------------------------------------------------------------------ hand-computed
@pytest.fixture
def hand_case(tmp_path: Path) -> dict:
    """A 40 x 60 m map (EPSG:32617, 1 m) and, as a mosaic, an all-nodata file then a uniform
    'Deciduous Forest' file (EPSG:5070, 30 m): every map pixel's old class is tree canopy."""
    codes = np.zeros((40, 60), dtype=np.uint8)
    codes[:20, :30] = TREE
    codes[:20, 30:] = BUILT
    codes[20:, :] = LOW
    codes[30:, 50:] = 0  # 100 nodata pixels
    map_path = write_map_cog(tmp_path / "map.tif", codes, UTM, from_origin(X0, Y0, 1, 1))
    transform, w, h = old_grid_around((X0, Y0 - 40, X0 + 60, Y0), UTM, ALBERS, 30.0)
    empty = write_old(tmp_path / "old_empty.tif", np.zeros((h, w)), ALBERS, transform)
    forest = write_old(tmp_path / "old_forest.tif", np.full((h, w), 41), ALBERS, transform)
    return {"map": map_path, "old": [empty, forest], "dir": tmp_path}


def test_change_map_hand_computed_transitions_and_km2(hand_case):
    out = hand_case["dir"] / "out" / "changes.tif"
    result = map_changes(hand_case["map"], hand_case["old"], "nlcd", out, progress=False)
    expected = {
        ("tree canopy", "tree canopy"): 600,
        ("tree canopy", "built-up"): 600,
        ("tree canopy", "low vegetation"): 800 - 100 + 400,
    }
    table = read_csv(result.csv)
    assert {k: v[0] for k, v in table.items()} == expected
    for key, pixels in expected.items():
        assert table[key][1] == pytest.approx(pixels * 1e-6)  # 1 m² pixels
    assert {(t.from_name, t.to_name): t.pixels for t in result.transitions} == expected

    with rasterio.open(out) as ds:
        data = ds.read(1)
        assert ds.crs.to_epsg() == 32617 and ds.res == (1.0, 1.0) and ds.nodata == 0
        assert json.loads(ds.tags()[CHANGES_TAG])["from_legend"] == "nlcd"
        colormap = ds.colormap(1)
    tree_tree, tree_built = transition_code(1, 1, 4), transition_code(1, 3, 4)
    assert (data[:20, :30] == tree_tree).all() and (data[:20, 30:] == tree_built).all()
    assert (data[30:, 50:] == 0).all()
    # changed pairs take the colour of the class they became; unchanged ones a muted colour
    assert colormap[tree_built][:3] == DEFAULT_TARGET.classes[3].color
    assert colormap[tree_tree][:3] != DEFAULT_TARGET.classes[1].color

    names = read_category_names(out)
    assert names[0] == "nodata"
    present = {i: n for i, n in enumerate(names) if n and i}
    assert present == {
        tree_tree: "tree canopy (no change)",
        tree_built: "tree canopy -> built-up",
        transition_code(1, 2, 4): "tree canopy -> low vegetation",
    }
    entries = ET.parse(result.qml).getroot().findall(".//paletteEntry")
    assert sorted(int(e.get("value")) for e in entries) == sorted(present)
    assert {e.get("label") for e in entries} == set(present.values())

    summary = result.summary.read_text()
    assert "| tree canopy | built-up | 600 | 0.000600 |" in summary
    assert "changed: 0.001700 km²" in summary  # 600 built-up + 1100 low vegetation
    # the STAC Item lists the pairs present (and nodata) with their colours
    item = json.loads(result.stac.read_text())
    classes = item["assets"]["data"]["classification:classes"]
    assert sorted(c["value"] for c in classes) == [0, *sorted(present)]
    # nothing left behind: no temporary files, no work folder
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["changes.tif", "changes.tif.aux.xml", "changes.qml", "changes.csv", "changes.md", "changes.stac.json"]
    )


def test_change_map_matches_pixel_centres_reprojected_independently(tmp_path: Path):
    """Random map and random 30 m EPSG:5070 product: each map pixel takes the old class of the
    30 m pixel holding its centre (computed here with pyproj, not GDAL)."""
    rng = np.random.default_rng(7)
    h, w = 90, 80
    codes = rng.integers(0, 5, size=(h, w)).astype(np.uint8)
    map_path = write_map_cog(tmp_path / "map.tif", codes, UTM, from_origin(X0, Y0, 1, 1))
    transform, ow, oh = old_grid_around((X0, Y0 - h, X0 + w, Y0), UTM, ALBERS, 30.0)
    old = rng.choice(np.array([11, 21, 41, 82, 12, 0]), size=(oh, ow))  # 12 (snow) has no target class
    old_path = write_old(tmp_path / "old.tif", old, ALBERS, transform)

    result = map_changes(map_path, [old_path], "nlcd", tmp_path / "changes.tif", block_px=512, progress=False)

    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = pyproj.Transformer.from_crs(UTM, ALBERS, always_xy=True).transform(X0 + cols, Y0 - rows)
    fc, fr = (xs - transform.c) / 30.0, (transform.f - ys) / 30.0
    # the test is exact only if no centre sits on a 30 m pixel edge (true for this layout)
    assert min(np.abs(fc - np.round(fc)).min(), np.abs(fr - np.round(fr)).min()) > 1e-5  # 0.3 mm
    old_codes = old[np.floor(fr).astype(int), np.floor(fc).astype(int)]
    old_target = {11: 0, 21: 3, 41: 1, 82: 2}  # NLCD -> water, built-up, tree canopy, low vegetation
    expected = np.zeros((h, w), dtype=np.uint8)
    for r in range(h):
        for c in range(w):
            if codes[r, c] and old_codes[r, c] in old_target:
                expected[r, c] = old_target[old_codes[r, c]] * 4 + (codes[r, c] - 1) + 1
    with rasterio.open(result.out) as ds:
        np.testing.assert_array_equal(ds.read(1), expected)
    counts = np.bincount(expected.ravel(), minlength=17)
    table = read_csv(result.csv)
    assert sum(p for p, _ in table.values()) == counts[1:].sum()
    for (f, t), (pixels, km2) in table.items():
        assert pixels == counts[NAMES.index(f) * 4 + NAMES.index(t) + 1]
        assert km2 == pytest.approx(pixels * 1e-6)


def test_geographic_map_areas_are_geodesic_per_row(tmp_path: Path):
    """A map in EPSG:4326 near 60°N read in two row windows: areas match the footprints' areas
    in an equal-area projection (EPSG:3035), and northern rows' pixels are smaller."""
    res, lon0, lat0, h, w = 1e-4, 10.0, 60.06, 600, 40
    codes = np.full((h, w), BUILT, dtype=np.uint8)
    codes[:300] = TREE  # the northern half
    transform = from_origin(lon0, lat0, res, res)
    map_path = write_map_cog(tmp_path / "map.tif", codes, "EPSG:4326", transform)
    old_transform, ow, oh = old_grid_around(
        (lon0, lat0 - h * res, lon0 + w * res, lat0), "EPSG:4326", "EPSG:3035", 100.0
    )
    old_path = write_old(tmp_path / "old.tif", np.full((oh, ow), 41), "EPSG:3035", old_transform)

    result = map_changes(map_path, old_path, "nlcd", tmp_path / "changes.tif", block_px=512, progress=False)

    to_laea = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform

    def km2(lat_top: float, lat_bottom: float) -> float:
        poly = box(lon0, lat_bottom, lon0 + w * res, lat_top).segmentize(res / 4)
        return shapely_transform(to_laea, poly).area / 1e6

    table = read_csv(result.csv)
    north = table[("tree canopy", "tree canopy")]
    south = table[("tree canopy", "built-up")]
    assert north[0] == south[0] == 300 * w
    assert north[1] == pytest.approx(km2(lat0, lat0 - 300 * res), rel=1e-6)
    assert south[1] == pytest.approx(km2(lat0 - 300 * res, lat0 - h * res), rel=1e-6)
    assert north[1] < south[1]


def test_pixel_area_in_a_foot_based_crs():
    areas = pixel_area_m2_per_row(rasterio.crs.CRS.from_epsg(2272), from_origin(0, 0, 3, 3), 5)  # US survey feet
    assert areas.shape == (5,)
    np.testing.assert_allclose(areas, 9 * 0.3048006096**2)


# ------------------------------------------------------------------------------------ errors
def test_no_overlap_is_an_input_error_and_leaves_nothing(tmp_path: Path):
    map_path = write_map_cog(tmp_path / "map.tif", np.full((20, 20), TREE), UTM, from_origin(X0, Y0, 1, 1))
    far = write_old(tmp_path / "far.tif", np.full((5, 5), 41), ALBERS, from_origin(0, 0, 30, 30))
    before = set(tmp_path.iterdir())
    with pytest.raises(LcmapInputError, match="does not overlap"):
        map_changes(map_path, far, "nlcd", tmp_path / "changes.tif", progress=False)
    assert set(tmp_path.iterdir()) == before


def test_old_without_any_class_over_the_map_is_an_input_error(tmp_path: Path):
    map_path = write_map_cog(tmp_path / "map.tif", np.full((20, 20), TREE), UTM, from_origin(X0, Y0, 1, 1))
    transform, w, h = old_grid_around((X0, Y0 - 20, X0 + 20, Y0), UTM, ALBERS, 30.0)
    empty = write_old(tmp_path / "empty.tif", np.zeros((h, w)), ALBERS, transform)
    with pytest.raises(LcmapInputError, match="no pixel holds a target class"):
        map_changes(map_path, empty, "nlcd", tmp_path / "changes.tif", progress=False)
    assert not (tmp_path / "changes.tif").exists()


def test_map_without_legend_tag_needs_map_legend(hand_case):
    untagged = write_map_cog(
        hand_case["dir"] / "untagged.tif", np.full((40, 60), TREE), UTM, from_origin(X0, Y0, 1, 1), legend_tag=False
    )
    with pytest.raises(LcmapInputError, match="LCMAP_LEGEND"):
        map_changes(untagged, hand_case["old"], "nlcd", hand_case["dir"] / "c.tif", progress=False)
    result = map_changes(
        untagged, hand_case["old"], "nlcd", hand_case["dir"] / "c.tif", map_legend_override="4class", progress=False
    )
    assert [(t.from_name, t.to_name, t.pixels) for t in result.transitions] == [("tree canopy", "tree canopy", 2400)]


def test_unknown_legend_and_outputs_overwriting_inputs_are_input_errors(hand_case):
    d, m, old = hand_case["dir"], hand_case["map"], hand_case["old"]
    with pytest.raises(LcmapInputError, match="unknown legend"):
        map_changes(m, old, "no-such-legend", d / "c.tif", progress=False)
    with pytest.raises(LcmapInputError, match="also an input"):
        map_changes(m, old, "nlcd", m, progress=False)
    with pytest.raises(LcmapInputError, match="also an input"):
        map_changes(m, old, "nlcd", old[1], progress=False)
    with pytest.raises(LcmapInputError, match="GeoTIFF"):
        map_changes(m, old, "nlcd", d / "c.csv", progress=False)


def test_cli_changes_exit_codes(hand_case):
    from lcmap.cli import app

    d = hand_case["dir"]
    args = [
        "changes",
        "--map",
        str(hand_case["map"]),
        "--old",
        str(hand_case["old"][0]),
        "--old",
        str(hand_case["old"][1]),
        "--out",
        str(d / "cli.tif"),
    ]
    runner = CliRunner()
    bad = runner.invoke(app, [*args, "--old-legend", "no-such-legend"], env={"COLUMNS": "400"})
    assert bad.exit_code == 2 and "unknown legend" in bad.output
    ok = runner.invoke(app, [*args, "--old-legend", "nlcd"], env={"COLUMNS": "400"})
    assert ok.exit_code == 0, ok.output
    assert (d / "cli.tif").is_file() and (d / "cli.stac.json").is_file()
    assert "0.0017" in ok.output  # changed km²
    # '--old A B' is '--old A --old B' (A alone has no class: it would fail)
    short = [
        "changes",
        "--map",
        str(hand_case["map"]),
        "--old",
        *map(str, hand_case["old"]),
        "--old-legend",
        "nlcd",
        "--out",
        str(d / "cli2.tif"),
    ]
    ok2 = runner.invoke(app, short, env={"COLUMNS": "400"})
    assert ok2.exit_code == 0, ok2.output
    assert (d / "cli2.csv").read_text() == (d / "cli.csv").read_text()
    help_text = runner.invoke(app, ["changes", "--help"], env={"COLUMNS": "200"}).output
    assert "pixels" in help_text and "CRS" in help_text


def test_end_to_end_on_the_embedded_sample(tmp_path: Path):
    """The sample's 1 m Chesapeake reference, re-encoded to the 4 target classes, as the map;
    the sample's NLCD 30 m as the old product (same CRS: expected pairs by index arithmetic)."""
    paths = sample_paths()
    ref_legend, nlcd = get_legend(paths["reference_legend"]), get_legend(paths["labels_legend"])
    with rasterio.open(paths["reference"][0]) as ref:
        ref_codes, crs, transform = ref.read(1), ref.crs, ref.transform
    lut = ref_legend.code_to_target_lut()
    target = lut[ref_codes]
    map_codes = np.where(target == 255, 0, target + 1).astype(np.uint8)
    map_path = write_map_cog(tmp_path / "map.tif", map_codes, crs.to_string(), transform)

    result = map_changes(map_path, paths["labels"], nlcd, tmp_path / "changes.tif", progress=False)

    with rasterio.open(paths["labels"][0]) as old:
        old_codes, ot = old.read(1), old.transform
    rows, cols = np.mgrid[0 : map_codes.shape[0], 0 : map_codes.shape[1]]
    xs, ys = transform.c + cols + 0.5, transform.f - rows - 0.5
    old_at = old_codes[((ot.f - ys) // 30).astype(int), ((xs - ot.c) // 30).astype(int)]
    old_target = nlcd.code_to_target_lut()[old_at]
    valid = (map_codes > 0) & (old_target != 255)
    expected = np.bincount((old_target[valid].astype(int) * 4 + map_codes[valid]), minlength=17)
    got = np.zeros(17, dtype=int)
    for t in result.transitions:
        got[t.code] = t.pixels
    np.testing.assert_array_equal(got, expected)
    assert any(t.changed for t in result.transitions)

"""Zonal statistics: the blockwise pair counter, pixel areas, ``zone_stats`` and ``lcmap stats``."""

from __future__ import annotations

import csv
import math

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from typer.testing import CliRunner

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import get_legend, target_legend
from lcmap.pipeline.analysis.zonal import count_pairs, overlap_layers, pixel_area_m2_per_row
from lcmap.pipeline.analysis.zone_stats import write_stats, zone_stats
from lcmap.pipeline.prediction.cog import legend_tag
from tests.rasters import write_raster

X0, Y0, RES = 500_000.0, 4_000_000.0, 2.0


def _tagged_map(path, data, crs="EPSG:32617", transform=None, legend=None, nodata=0):
    write_raster(path, data, crs, transform or from_origin(X0, Y0, RES, RES), nodata)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(LCMAP_LEGEND=legend_tag(legend or target_legend()))
    return path


def _zones(path, boxes, crs="EPSG:32617", to_crs="EPSG:4326"):
    frame = gpd.GeoDataFrame({"name": list(boxes)}, geometry=[shapely.box(*b) for b in boxes.values()], crs=crs)
    frame.to_crs(to_crs).to_file(path, driver="GPKG")
    return path


def _layout(h=60, w=80, seed=0):
    """Classes 1-4 at random, a nodata (0) band of rows 10-14, an unused code 9 nowhere."""
    data = np.random.default_rng(seed).integers(1, 5, size=(h, w)).astype(np.uint8)
    data[10:15] = 0
    return data


# ---------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_count_pairs_matches_a_direct_count_for_any_block_size(chunk) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, (50, 70)), rng.integers(0, 3, (50, 70))
    rows = rng.uniform(1, 2, 50)
    got = count_pairs(da.from_array(a, chunks=chunk), da.from_array(b, chunks=(chunk + 3, chunk)), 5, 3, rows)
    want_px = np.zeros((5, 3), np.int64)
    want_m2 = np.zeros((5, 3))
    np.add.at(want_px, (a, b), 1)
    np.add.at(want_m2, (a, b), np.repeat(rows[:, None], 70, axis=1))
    np.testing.assert_array_equal(got.pixels, want_px)
    np.testing.assert_allclose(got.area_m2, want_m2, rtol=1e-12)


def test_count_pairs_refuses_indices_out_of_range() -> None:
    a = da.from_array(np.full((4, 4), 3), chunks=2)
    with pytest.raises(ValueError, match="outside"):
        count_pairs(a, da.zeros((4, 4), dtype=int, chunks=2), 3, 2, np.ones(4))


def _band_area_m2(lat0: float, lat1: float, dlon_deg: float) -> float:
    """Analytic area of a latitude band on WGS84 (authalic formula), independent of pyproj."""
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    e = math.sqrt(e2)

    def q(phi: float) -> float:
        s = math.sin(math.radians(phi))
        return s / (1 - e2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    return abs(math.radians(dlon_deg) * a * a * (1 - e2) / 2 * (q(lat1) - q(lat0)))


def test_pixel_area_projected_and_geographic() -> None:
    np.testing.assert_allclose(pixel_area_m2_per_row("EPSG:32617", from_origin(0, 0, 2, 3), 4), 6.0)
    feet = pixel_area_m2_per_row("EPSG:2272", from_origin(0, 0, 1, 1), 1)  # US survey feet
    assert feet[0] == pytest.approx(0.3048006096**2, rel=1e-6)
    # big pixels (1° x 0.5°): the parallels must be followed, not the geodesics between corners
    rows = pixel_area_m2_per_row("EPSG:4326", from_origin(10, 60, 1.0, 0.5), 4)
    want = [_band_area_m2(60 - 0.5 * r, 60 - 0.5 * (r + 1), 1.0) for r in range(4)]
    np.testing.assert_allclose(rows, want, rtol=1e-6)
    assert rows[0] < rows[-1]  # smaller towards the pole


# ---------------------------------------------------------------------------------------- zone_stats
def test_projected_map_zones_in_another_crs(tmp_path) -> None:
    data = _layout()
    map_path = _tagged_map(tmp_path / "map.tif", data)
    # zone "west": columns 0-29, "east": columns 30-79 (edges on pixel edges), "far": off the map
    zones = _zones(
        tmp_path / "z.gpkg",
        {
            "west": (X0, Y0 - 120, X0 + 60, Y0),
            "east": (X0 + 60, Y0 - 120, X0 + 160, Y0),
            "far": (X0 + 10_000, Y0 - 120, X0 + 10_100, Y0),
        },
    )
    stats, _ = zone_stats(map_path, zones, "name", block_px=16)
    assert stats.zone_names == ["west", "east", "far"] and stats.class_codes == [1, 2, 3, 4]
    for z, cols in enumerate([slice(0, 30), slice(30, 80)]):
        want = np.array([(data[:, cols] == c).sum() for c in (1, 2, 3, 4)])
        np.testing.assert_array_equal(stats.pixels[z], want)
        np.testing.assert_allclose(stats.area_km2[z], want * RES * RES / 1e6)
        np.testing.assert_allclose(stats.percent[z], want / want.sum() * 100)
    assert stats.pixels[0].sum() + stats.pixels[1].sum() == (data > 0).sum()  # nodata not counted
    assert stats.pixels[2].sum() == 0 and stats.percent[2].sum() == 0


def test_overlapping_zones_each_count_the_shared_pixels(tmp_path) -> None:
    """Zones that overlap both count the area they share (before: the later zone took it, the
    earlier got 0 km² there); a partition stays one layer, touching zones do not overlap."""
    data = _layout()  # 60 x 80 px of 2 m; nodata rows 10-14
    map_path = _tagged_map(tmp_path / "map.tif", data)
    boxes = {
        "a": (X0, Y0 - 120, X0 + 100, Y0),  # columns 0-49
        "b": (X0 + 60, Y0 - 120, X0 + 160, Y0),  # columns 30-79: shares 30-49 with a
        "c": (X0 + 20, Y0 - 80, X0 + 40, Y0 - 40),  # columns 10-19, rows 20-39: inside a
        "d": (X0 + 160, Y0 - 120, X0 + 200, Y0),  # touches b's edge, off the map
    }
    stats, _ = zone_stats(map_path, _zones(tmp_path / "z.gpkg", boxes), "name", block_px=16)
    windows = {"a": np.s_[:, 0:50], "b": np.s_[:, 30:80], "c": np.s_[20:40, 10:20]}
    for z, name in enumerate(stats.zone_names[:3]):
        want = np.array([(data[windows[name]] == c).sum() for c in (1, 2, 3, 4)])
        np.testing.assert_array_equal(stats.pixels[z], want)
        np.testing.assert_allclose(stats.area_km2[z], want * RES * RES / 1e6)
    # by hand: a 50 x 60 px less 5 nodata rows = 2750 px = 0.011 km²; b the same; c 20 x 10 = 200 px
    np.testing.assert_allclose(stats.area_km2[:3].sum(axis=1), [0.011, 0.011, 0.0008])
    assert stats.pixels[3].sum() == 0
    geoms = [shapely.box(*b) for b in boxes.values()]
    assert overlap_layers(geoms) == [[0, 3], [1, 2]]
    assert overlap_layers([geoms[0], geoms[3]]) == [[0, 1]] and overlap_layers([]) == []


def test_same_result_for_several_block_sizes(tmp_path) -> None:
    data = _layout(97, 131, seed=3)
    map_path = _tagged_map(tmp_path / "map.tif", data)
    zones = _zones(
        tmp_path / "z.gpkg", {"a": (X0 + 11, Y0 - 150, X0 + 143, Y0 - 3), "b": (X0 + 100, Y0 - 194, X0 + 262, Y0 - 40)}
    )
    results = [zone_stats(map_path, zones, "name", block_px=bp)[0] for bp in (8, 33, 512)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.pixels, results[0].pixels)
        np.testing.assert_allclose(other.area_km2, results[0].area_km2)
    assert results[0].pixels.sum() > 0


def test_geographic_map_areas_per_latitude(tmp_path) -> None:
    h, w, step = 40, 30, 0.01
    data = np.ones((h, w), np.uint8)
    data[:, 20:] = 2
    data[5] = 0
    transform = from_origin(-80.0, 45.0, step, step)
    map_path = _tagged_map(tmp_path / "map.tif", data, crs="EPSG:4326", transform=transform)
    zones = _zones(tmp_path / "z.gpkg", {"all": (-80.5, 44.0, -79.0, 45.5)}, crs="EPSG:4326", to_crs="EPSG:3857")
    stats, _ = zone_stats(map_path, zones, "name", block_px=16)
    rows = [_band_area_m2(45 - r * step, 45 - (r + 1) * step, step) for r in range(h) if r != 5]
    want_km2 = np.array([20 * sum(rows), 10 * sum(rows)]) / 1e6
    np.testing.assert_allclose(stats.area_km2[0, :2], want_km2, rtol=1e-6)
    assert stats.pixels[0, :2].tolist() == [20 * (h - 1), 10 * (h - 1)]


def test_category_names_stand_in_for_the_legend_tag(tmp_path) -> None:
    data = _layout()
    path = write_raster(tmp_path / "map.tif", data, "EPSG:32617", from_origin(X0, Y0, RES, RES), 0)
    zones = _zones(tmp_path / "z.gpkg", {"all": (X0, Y0 - 120, X0 + 160, Y0)})
    with pytest.raises(LcmapInputError, match="LCMAP_LEGEND"):
        zone_stats(path, zones, "name")
    # GDAL category names in the PAM sidecar, as QGIS or gdal_edit write them
    cats = "".join(f"<Category>{n}</Category>" for n in ("nodata", "sea", "", "forest", "town"))
    (tmp_path / "map.tif.aux.xml").write_text(
        f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{cats}</CategoryNames></PAMRasterBand></PAMDataset>'
    )
    stats, _ = zone_stats(path, zones, "name")
    assert stats.class_codes == [1, 3, 4] and stats.class_names == ["sea", "forest", "town"]
    assert stats.pixels[0].tolist() == [int((data == c).sum()) for c in (1, 3, 4)]


def test_input_errors(tmp_path) -> None:
    map_path = _tagged_map(tmp_path / "map.tif", _layout())
    zones = _zones(tmp_path / "z.gpkg", {"a": (X0, Y0 - 120, X0 + 160, Y0)})
    with pytest.raises(LcmapInputError, match="no field 'district'"):
        zone_stats(map_path, zones, "district")
    far = _zones(tmp_path / "far.gpkg", {"a": (X0 + 1e5, Y0 - 120, X0 + 1e5 + 160, Y0)})
    with pytest.raises(LcmapInputError, match="no zone overlaps"):
        zone_stats(map_path, far, "name")


# ---------------------------------------------------------------------------------------- CLI
def test_cli_stats_on_the_sample_reference(tmp_path) -> None:
    from lcmap.cli import app
    from lcmap.geodata.sample import sample_paths

    src_path = sample_paths()["reference"][0]
    with rasterio.open(src_path) as src:
        data, crs, transform, bounds = src.read(1), src.crs, src.transform, src.bounds
    legend = get_legend("chesapeake")
    map_path = _tagged_map(tmp_path / "map.tif", data, crs=crs.to_string(), transform=transform, legend=legend)
    half = (bounds.left + bounds.right) / 2
    zones = _zones(
        tmp_path / "d.gpkg",
        {
            "west": (bounds.left, bounds.bottom, half, bounds.top),
            "east": (half, bounds.bottom, bounds.right, bounds.top),
        },
        crs=crs.to_string(),
    )
    out = tmp_path / "stats"
    result = CliRunner().invoke(
        app,
        [
            "stats",
            "--map",
            str(map_path),
            "--zones",
            str(zones),
            "--field",
            "name",
            "--out",
            str(out),
            "--block-px",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "stats.csv").open()))
    assert len(rows) == 2 * len(legend.codes)
    col = int(round((half - bounds.left) / transform.a))
    for zone, part in (("west", data[:, :col]), ("east", data[:, col:])):
        for code, name in zip(legend.codes, legend.names, strict=True):
            row = next(r for r in rows if r["zone"] == zone and int(r["class_code"]) == code)
            assert row["class_name"] == name and int(row["pixels"]) == int((part == code).sum())
            assert float(row["km2"]) == pytest.approx((part == code).sum() * 1e-6, abs=1e-6)
    frame = gpd.read_file(out / "stats.gpkg")
    assert list(frame["name"]) == ["west", "east"] and "km2_tree_canopy_and_shrubs" in frame.columns
    assert frame["km2_classified"].sum() == pytest.approx(np.isin(data, legend.codes).sum() * 1e-6)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    bad = CliRunner().invoke(
        app, ["stats", "--map", str(map_path), "--zones", str(zones), "--field", "NAME", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "has no field 'NAME'" in " ".join(bad.output.split())


def test_write_stats_replaces_previous_outputs(tmp_path) -> None:
    map_path = _tagged_map(tmp_path / "map.tif", _layout())
    zones = _zones(tmp_path / "z.gpkg", {"a": (X0, Y0 - 120, X0 + 160, Y0)})
    stats, frame = zone_stats(map_path, zones, "name")
    for _ in range(2):
        csv_path, gpkg_path = write_stats(stats, frame, tmp_path / "out")
    assert len(gpd.read_file(gpkg_path)) == 1 and len(csv_path.read_text().splitlines()) == 1 + 4

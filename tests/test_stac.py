"""STAC Items beside the maps: content checked directly, and validated against offline schemas only."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from map_rasters import write_map_cog
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from typer.testing import CliRunner

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import DEFAULT_TARGET, get_legend
from lcmap.pipeline.analysis.stac import IMAGERY_DATETIME_TAG, stac_item_path, write_stac_item

UTM = "EPSG:32617"
X0, Y0 = 500_000.0, 4_000_000.0


@pytest.fixture
def map_path(tmp_path: Path) -> Path:
    codes = np.zeros((50, 70), dtype=np.uint8)
    codes[:, :35], codes[:, 35:] = 2, 4
    codes[:10] = 0
    return write_map_cog(tmp_path / "maps" / "map.tif", codes, UTM, from_origin(X0, Y0, 1, 1))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ content
def test_item_beside_the_map_with_footprint_projection_and_classes(map_path: Path):
    path = write_stac_item(map_path)
    assert path == map_path.with_name("map.stac.json") == stac_item_path(map_path)
    item = load(path)
    assert item["type"] == "Feature" and item["id"] == "map"

    with rasterio.open(map_path) as ds:
        expected_bbox = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
        shape, transform = [ds.height, ds.width], list(ds.transform)[:6]
    np.testing.assert_allclose(item["bbox"], expected_bbox, atol=1e-7)
    lons = [p[0] for p in item["geometry"]["coordinates"][0]]
    assert min(lons) == pytest.approx(expected_bbox[0], abs=1e-7) and -82 < min(lons) < -80

    props = item["properties"]
    assert props["proj:epsg"] == 32617
    assert props["proj:shape"] == shape and props["proj:transform"][:6] == transform
    assert props["gsd"] == 1.0
    assert props["lcmap:datetime_source"] == "created"  # no imagery date known
    assert dt.datetime.fromisoformat(props["datetime"].replace("Z", "+00:00")).year >= 2024

    data = item["assets"]["data"]
    assert data["href"] == "map.tif" and "data" in data["roles"]
    assert data["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert data["raster:bands"][0]["data_type"] == "uint8" and data["raster:bands"][0]["nodata"] == 0
    classes = {c["value"]: c for c in data["classification:classes"]}
    assert classes[0]["nodata"] is True
    for tc in DEFAULT_TARGET.classes:
        assert classes[tc.code]["title"] == tc.name
        assert classes[tc.code]["color_hint"] == "{:02X}{:02X}{:02X}".format(*tc.color)
    assert classes[2]["name"] == "tree_canopy" and classes[4]["name"] == "built_up"

    # every href is relative and points at a file beside the Item
    hrefs = {k: a["href"] for k, a in item["assets"].items()}
    assert hrefs["style"] == "map.qml" and hrefs["categories"] == "map.tif.aux.xml"
    for href in hrefs.values():
        assert not Path(href).is_absolute() and (map_path.parent / href).is_file()
    assert "report" not in hrefs  # none present


def test_native_legend_map_lists_the_legend_codes(tmp_path: Path):
    nlcd = get_legend("nlcd")
    codes = np.full((20, 20), 41, dtype=np.uint8)
    path = write_map_cog(tmp_path / "native.tif", codes, UTM, from_origin(X0, Y0, 1, 1), legend=nlcd)
    item = load(write_stac_item(path))
    titles = {c["value"]: c["title"] for c in item["assets"]["data"]["classification:classes"]}
    assert titles[41] == "Deciduous Forest" and titles[11] == "Open Water" and len(titles) == len(nlcd) + 1


def test_imagery_datetime_from_tag_argument_or_range(tmp_path: Path, map_path: Path):
    tagged = write_map_cog(
        tmp_path / "tagged.tif",
        np.full((8, 8), 1),
        UTM,
        from_origin(X0, Y0, 1, 1),
        tags={IMAGERY_DATETIME_TAG: "2020-04-15"},
    )
    props = load(write_stac_item(tagged))["properties"]
    assert props["datetime"] == "2020-04-15T00:00:00Z" and props["lcmap:datetime_source"] == "imagery"

    props = load(write_stac_item(map_path, imagery_datetime="2019-06-01/2019-09-30"))["properties"]
    assert props["datetime"] is None
    assert props["start_datetime"] == "2019-06-01T00:00:00Z" and props["end_datetime"] == "2019-09-30T00:00:00Z"
    props = load(write_stac_item(map_path, imagery_datetime=dt.datetime(2021, 7, 1, 12, tzinfo=dt.UTC)))["properties"]
    assert props["datetime"] == "2021-07-01T12:00:00Z"

    with pytest.raises(LcmapInputError, match="ISO 8601"):
        write_stac_item(map_path, imagery_datetime="last summer")
    with pytest.raises(LcmapInputError, match="ends before"):
        write_stac_item(map_path, imagery_datetime="2020-01-02/2020-01-01")


def test_reports_and_links_are_relative(tmp_path: Path, map_path: Path):
    report = tmp_path / "eval" / "report.md"
    report.parent.mkdir()
    report.write_text("# report\n")
    map_path.with_suffix(".md").write_text("# summary\n")
    item = load(write_stac_item(map_path, reports=[report], derived_from=[tmp_path / "old.tif"]))
    assert item["assets"]["report"]["href"] == "map.md"
    assert item["assets"]["report-1"]["href"] == "../eval/report.md"
    assert item["assets"]["report-1"]["type"] == "text/markdown"
    assert [(lk["rel"], lk["href"]) for lk in item["links"]] == [("derived_from", "../old.tif")]
    with pytest.raises(LcmapInputError, match="does not exist"):
        write_stac_item(map_path, reports=[tmp_path / "missing.md"])


def test_missing_or_crs_less_map_is_an_input_error(tmp_path: Path):
    with pytest.raises(LcmapInputError, match="does not exist"):
        write_stac_item(tmp_path / "nothing.tif")
    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 4, 4), dtype=np.uint8))
    with pytest.raises(LcmapInputError, match="no CRS"):
        write_stac_item(bare)


def test_cli_stac_rewrites_the_item(map_path: Path):
    from lcmap.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["stac", "--map", str(map_path), "--datetime", "2018-05-01"])
    assert result.exit_code == 0, result.output
    assert load(stac_item_path(map_path))["properties"]["datetime"] == "2018-05-01T00:00:00Z"
    bad = runner.invoke(app, ["stac", "--map", str(map_path.with_name("none.tif"))], env={"COLUMNS": "400"})
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_stac_refuses_rasters_lcmap_did_not_write_whole(tmp_path: Path):
    """An Item claims a complete cloud-optimised lcmap map: a raster without lcmap's tags (NLCD,
    NAIP), an lcmap-tagged GeoTIFF that is not a COG, or a truncated copy of a map is refused,
    exit 2, no Item written (before: an Item for each, exit 0)."""
    from lcmap.cli import app
    from lcmap.geodata.sample import sample_paths
    from lcmap.pipeline.prediction.cog import legend_tag

    codes = np.random.default_rng(0).integers(0, 5, (1100, 1300)).astype(np.uint8)
    whole = write_map_cog(tmp_path / "whole.tif", codes, UTM, from_origin(X0, Y0, 1, 1))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:-100])  # the last tile cut short (a COG tile's 4-byte trailer and more)
    striped = tmp_path / "striped.tif"
    profile = dict(driver="GTiff", width=300, height=200, count=1, dtype="uint8", crs=UTM, nodata=0)
    with rasterio.open(striped, "w", transform=from_origin(X0, Y0, 1, 1), **profile) as dst:
        dst.write(codes[None, :200, :300])
        dst.update_tags(LCMAP_LEGEND=legend_tag(get_legend("4class")))
    files = sample_paths()
    nlcd, naip = tmp_path / "nlcd.tif", tmp_path / "naip.tif"  # copies: no Item lands in the package
    nlcd.write_bytes(Path(files["labels"][0]).read_bytes())
    naip.write_bytes(Path(files["imagery"][0]).read_bytes())
    cases = [
        (nlcd, "not a land-cover or change map written by lcmap"),
        (naip, "not a land-cover or change map written by lcmap"),
        (striped, "not a valid Cloud Optimized GeoTIFF"),
        (cut, "cut short"),
    ]
    runner = CliRunner()
    for path, why in cases:
        result = runner.invoke(app, ["stac", "--map", str(path)], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and why in result.output, (path, result.output)
        assert not stac_item_path(path).exists()
    assert runner.invoke(app, ["stac", "--map", str(whole)]).exit_code == 0 and stac_item_path(whole).is_file()


# ------------------------------------------------------------------------------------ validation
#: Optional local copies of further schemas, laid out as their URLs:
#: $LCMAP_STAC_SCHEMA_DIR/stac-extensions.github.io/raster/v1.1.0/schema.json
SCHEMA_DIR_ENV = "LCMAP_STAC_SCHEMA_DIR"


class SchemaNotOffline(Exception):
    """A schema that is neither bundled with pystac nor in $LCMAP_STAC_SCHEMA_DIR (it would have to be downloaded)."""


def offline_validator() -> Any:
    """pystac's JSON-schema validator restricted to local schemas: pystac's bundled ones and those in
    ``$LCMAP_STAC_SCHEMA_DIR``; never the network."""
    pytest.importorskip("jsonschema", reason="jsonschema (test extra) is needed to validate STAC Items")
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    folder = os.environ.get(SCHEMA_DIR_ENV)

    class OfflineValidator(JsonSchemaSTACValidator):
        def _get_schema(self, schema_uri: str) -> dict[str, Any]:
            if schema_uri not in self.schema_cache:
                local = Path(folder, schema_uri.split("://", 1)[-1].split("#")[0]) if folder else None
                if local is None or not local.is_file():
                    raise SchemaNotOffline(schema_uri)
                self.schema_cache[schema_uri] = json.loads(local.read_text())
            return self.schema_cache[schema_uri]

    return OfflineValidator()


def _validate_core(validator: Any, item: dict[str, Any]) -> None:
    from pystac import STACObjectType

    validator.validate_core(item, STACObjectType.ITEM, item["stac_version"], href="map.stac.json")


def test_item_validates_against_the_offline_core_schema(map_path: Path):
    from pystac.errors import STACValidationError

    validator = offline_validator()
    item = load(write_stac_item(map_path))
    try:
        _validate_core(validator, item)
    except SchemaNotOffline as exc:
        pytest.skip(f"the STAC core schema {exc} is not bundled with this pystac; no network to fetch it")
    broken = copy.deepcopy(item)
    broken["bbox"] = "everywhere"
    with pytest.raises(STACValidationError):  # the validator does reject a bad Item
        _validate_core(validator, broken)


def test_item_validates_against_the_extension_schemas_offline(map_path: Path):
    from pystac import STACObjectType

    validator = offline_validator()
    item = load(write_stac_item(map_path))
    assert len(item["stac_extensions"]) == 3  # projection, raster, classification
    for uri in item["stac_extensions"]:
        try:
            validator.validate_extension(item, STACObjectType.ITEM, item["stac_version"], uri, href="map.stac.json")
        except SchemaNotOffline as exc:
            pytest.skip(
                f"extension schema {exc} is not bundled with pystac and there is no network to fetch it "
                f"(put a copy under ${SCHEMA_DIR_ENV} to validate offline); the Item's extension "
                "fields are checked directly by the tests above"
            )


# ------------------------------------------------------------------------------------ lcmap predict
def _tagged_imagery(path: Path, x0: float, **tags: str) -> Path:
    rng = np.random.default_rng(int(x0) % 97)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=UTM,
        transform=from_origin(x0, Y0, 1, 1),
    ) as dst:  # fmt: skip
        dst.write(rng.integers(1, 255, (3, 64, 64)).astype(np.uint8))
        dst.update_tags(**tags)
    return path


def test_imagery_datetime_of_reads_date_tags(tmp_path: Path):
    from lcmap.pipeline.analysis.stac import imagery_datetime_of

    a = _tagged_imagery(tmp_path / "a.tif", X0, YEAR="2014")
    b = _tagged_imagery(tmp_path / "b.tif", X0 + 64, **{IMAGERY_DATETIME_TAG: "2016-06-02"})
    c = _tagged_imagery(tmp_path / "c.tif", X0 + 128, TIFFTAG_DATETIME="2020:01:01 00:00:00")
    assert imagery_datetime_of([a]) == "2014-01-01T00:00:00+00:00/2014-12-31T23:59:59+00:00"
    assert imagery_datetime_of([b]) == "2016-06-02T00:00:00+00:00"
    assert imagery_datetime_of([a, b]) == "2014-01-01T00:00:00+00:00/2016-06-02T00:00:00+00:00"
    assert imagery_datetime_of([c]) is None  # the file's creation time is no acquisition date
    assert imagery_datetime_of([a, c]) is None  # one file without a date: unknown


def test_predict_writes_the_stac_item_with_the_imagery_date(tmp_path: Path):
    import torch

    from lcmap.geodata.legends import target_legend
    from lcmap.models import build_model
    from lcmap.pipeline.prediction.predict import PredictConfig, predict_map
    from lcmap.pipeline.runs import save_checkpoint

    images = [
        _tagged_imagery(tmp_path / "img" / "a.tif", X0, **{IMAGERY_DATETIME_TAG: "2018-05-01/2018-05-03"}),
        _tagged_imagery(tmp_path / "img" / "b.tif", X0 + 64, **{IMAGERY_DATETIME_TAG: "2018-05-07"}),
    ]
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "m.ckpt", build_model("unet", 3, 4), "unet", target_legend(), [128.0] * 3, [60.0] * 3
    )
    out = predict_map(
        PredictConfig.of(
            ckpt, images, tmp_path / "out" / "map.tif", tile_px=64, overlap_px=16, scheduler="synchronous"
        ),
        progress=False,
    ).path
    item = load(stac_item_path(out))
    props = item["properties"]
    assert props["lcmap:datetime_source"] == "imagery" and props["datetime"] is None
    assert props["start_datetime"].startswith("2018-05-01") and props["end_datetime"].startswith("2018-05-07")
    assert item["assets"]["data"]["href"] == "map.tif"
    assert [c["value"] for c in item["assets"]["data"]["classification:classes"]][1:] == [1, 2, 3, 4]
    # imagery without a date tag: the map's time, said so
    plain = [_tagged_imagery(tmp_path / "plain.tif", X0)]
    out2 = predict_map(
        PredictConfig.of(
            ckpt, plain, tmp_path / "out2" / "map.tif", tile_px=64, overlap_px=16, scheduler="synchronous"
        ),
        progress=False,
    ).path
    assert load(stac_item_path(out2))["properties"]["lcmap:datetime_source"] == "created"

"""Imagery where users keep it: ``http(s)://`` COG URLs and STAC Item/ItemCollection JSON files
as ``--images`` / ``--reference`` (and any raster input), read through GDAL's ``/vsicurl/`` with
range requests from a real HTTP server on 127.0.0.1 (:mod:`tests.http_server`, no other network).

- the map from URLs equals the map from the local files, bit for bit, and the bytes transferred are a
  fraction of the files': test_map_from_urls_equals_local_and_reads_a_fraction
- the map from a STAC ItemCollection (pystac, hrefs on the server) too: test_map_from_stac_item_collection
- a 404 and a refused port: one message naming the URL, exit 2, in seconds: test_cli_unreachable_url_exits_2
- evaluate with --reference URLs scores as with the files: test_evaluate_reference_urls
- resolution: .txt lists, globs, .vrt over URLs, STAC asset choice and hrefs, outputs skipped
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import shapely
import torch
from rasterio.warp import transform_bounds
from typer.testing import CliRunner

from lcmap.cli import app
from lcmap.errors import LcmapInputError
from lcmap.geodata.io import check_not_an_input, check_raster_file, find_raster_files
from lcmap.geodata.legends import get_legend, target_legend
from lcmap.geodata.remote import remote_identities
from lcmap.geodata.sample import sample_paths
from lcmap.geodata.stac_inputs import asset_choice, stac_asset_hrefs
from lcmap.models import build_model
from lcmap.pipeline.analysis.evaluate import evaluate_map
from lcmap.pipeline.prediction.predict import PredictConfig, predict_map
from lcmap.pipeline.runs import save_checkpoint
from lcmap.pipeline.training.config import TrainConfig
from tests.http_server import RangeServer
from tests.rasters import fake_imagery

runner = CliRunner()
#: Parts of patches 7 and 3 of the sample (EPSG:26917), with 94 m without imagery between them.
BBOX = (538189.0, 4164500.0, 538381.0, 4164596.0)
FAST = dict(tile_px=64, overlap_px=16, batch_size=8, scheduler="synchronous")


def _squash(text: str) -> str:
    return "".join(text.split())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cogs(tmp_path_factory) -> Path:
    """COG copies of the sample's NAIP patches (the sample's are one strip each, not tiled): 64 px
    tiles, deflate, overviews; in ``ROOT/naip/``."""
    root = tmp_path_factory.mktemp("served")
    (root / "naip").mkdir()
    for src in sample_paths()["imagery"]:
        with rasterio.open(src) as ds:
            assert not ds.profile.get("tiled")  # else the copies would not be needed
        rasterio.shutil.copy(src, root / "naip" / src.name, driver="COG", blocksize=64, compress="deflate")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("unet", 4, len(target_legend()))
    with torch.no_grad():  # sharpen the random head so that several classes win somewhere
        model.net.segmentation_head[0].weight.mul_(8.0)
    path = tmp_path_factory.mktemp("model") / "m.ckpt"
    return save_checkpoint(path, model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)


@pytest.fixture(scope="module")
def local_map(cogs: Path, checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "map.tif"
    files = sorted(str(p) for p in (cogs / "naip").glob("*.tif"))
    predict_map(PredictConfig.of(checkpoint, files, out, bbox=BBOX, bbox_crs="EPSG:26917", **FAST), progress=False)
    return out


def _same_map(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert (x.crs, x.transform, x.shape, x.nodata) == (y.crs, y.transform, y.shape, y.nodata)
        left, right = x.read(), y.read()
    assert np.array_equal(left, right)
    assert len(np.unique(left)) >= 3  # classes and nodata (the gap between the patches)


# ------------------------------------------------------------------------------- the maps
def test_map_from_urls_equals_local_and_reads_a_fraction(
    cogs: Path, checkpoint: Path, local_map: Path, tmp_path: Path
) -> None:
    """The map from URLs is the map from the files, and reading it took a fraction of the files'
    bytes: their headers and the tiles under the bbox (a fresh server, so fresh URLs: GDAL caches
    what it read, by URL)."""
    files = sorted((cogs / "naip").glob("*.tif"))
    with RangeServer(cogs) as server:
        urls = [server.url(f"naip/{p.name}") for p in files]
        result = predict_map(
            PredictConfig.of(checkpoint, urls, tmp_path / "map.tif", bbox=BBOX, bbox_crs="EPSG:26917", **FAST),
            progress=False,
        )
        stats = server.stats()
        identities = remote_identities(urls)  # the resume fingerprint: URL, size, version
    _same_map(local_map, result.path)
    assert {path for _, path, _ in stats["requests"]} == {f"/naip/{p.name}" for p in files}
    assert all(method == "HEAD" or rng for method, _, rng in stats["requests"])  # range requests only
    assert [identities[u][1] for u in urls] == [p.stat().st_size for p in files]
    assert {identities[u][2] for u in urls} == {"Mon, 01 Jan 2024 00:00:00 GMT"}  # the server's Last-Modified
    sent, total = stats["bytes_sent"], sum(p.stat().st_size for p in files)
    area_km2 = (BBOX[2] - BBOX[0]) * (BBOX[3] - BBOX[1]) / 1e6
    print(
        f"\nHTTP: {sent} of {total} bytes ({sent / total:.0%}) in {len(stats['requests'])} requests for a "
        f"{area_km2:.4f} km2 bbox over 2 of 8 files; the files hold {total / (8 * 256 * 256 / 1e6) / 1e6:.1f} MB/km2"
    )
    assert 0 < sent < 0.5 * total


def _item_collection(path: Path, hrefs: list[str], server: RangeServer) -> Path:
    """An ItemCollection as a pystac-client search saves it: each Item's ``naip`` asset on the
    server, and a ``visual`` asset that is missing there (read by default, so ``--stac-asset naip``
    must be honoured for the map to be made)."""
    import pystac

    items = []
    for i, href in enumerate(hrefs):
        with rasterio.open(href) as src:
            bbox = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))
        item = pystac.Item(
            id=f"naip-{i}",
            geometry=shapely.geometry.mapping(shapely.box(*bbox)),
            bbox=bbox,
            datetime=None,
            properties={"start_datetime": "2014-01-01T00:00:00Z", "end_datetime": "2014-12-31T23:59:59Z"},
        )
        item.add_asset("visual", pystac.Asset(href=server.url(f"missing-{i}.tif"), media_type=pystac.MediaType.COG))
        item.add_asset("naip", pystac.Asset(href=href, media_type=pystac.MediaType.COG, roles=["data"]))
        items.append(item)
    pystac.ItemCollection(items).save_object(dest_href=str(path))
    return path


def test_map_from_stac_item_collection(cogs: Path, checkpoint: Path, local_map: Path, tmp_path: Path) -> None:
    """Through the CLI, with --stac-asset: the map equals the map from the local files."""
    files = sorted((cogs / "naip").glob("*.tif"))
    with RangeServer(cogs) as server:
        search = _item_collection(tmp_path / "search.json", [server.url(f"naip/{p.name}") for p in files], server)
        args = ["predict", "--model", str(checkpoint), "--images", str(search), "--out", str(tmp_path / "map.tif")]
        args += ["--bbox", *map(str, BBOX), "--bbox-crs", "EPSG:26917", "--scheduler", "synchronous"]
        args += ["--tile-px", "64", "--overlap-px", "16", "--batch-size", "8"]
        result = runner.invoke(app, [*args, "--stac-asset", "naip"])
        assert result.exit_code == 0, result.output
        default = runner.invoke(app, [*args[:6], str(tmp_path / "other.tif")])  # predict --model --images --out
    _same_map(local_map, tmp_path / "map.tif")
    assert default.exit_code == 2 and "missing-0.tif" in _squash(default.output), default.output  # visual: 404


# ------------------------------------------------------------------------------- errors
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_unreachable_url_exits_2(cogs: Path, checkpoint: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:
        cases = [
            (server.url("naip/missing.tif"), "404"),
            (f"http://127.0.0.1:{_free_port()}/naip/patch-0.tif", "connect"),
        ]
        for url, reason in cases:
            t0 = time.perf_counter()
            result = runner.invoke(
                app, ["predict", "--model", str(checkpoint), "--images", url, "--out", str(tmp_path / "m.tif")]
            )
            seconds = time.perf_counter() - t0
            out = result.output
            assert result.exit_code == 2, out
            assert out.startswith("error:") and "Traceback" not in out, out
            assert _squash(url) in _squash(out) and reason in out.lower(), out
            assert seconds < 5, seconds
    assert not (tmp_path / "m.tif").exists()


def test_error_is_one_line_naming_the_url(cogs: Path) -> None:
    with RangeServer(cogs) as server:
        url = server.url("naip/missing.tif")
        with pytest.raises(LcmapInputError) as err:
            check_raster_file(url, "imagery")
        with pytest.raises(LcmapInputError, match="missing.tif"):
            remote_identities([url])
    message = str(err.value)
    assert "\n" not in message and url in message and "404" in message


def test_url_without_raster_extension_is_refused() -> None:
    with pytest.raises(LcmapInputError, match="does not end in"):
        find_raster_files("https://example.com/download?id=3", "imagery")


# ------------------------------------------------------------------------------- other commands
def test_evaluate_reference_urls(local_map: Path, tmp_path: Path) -> None:
    refs = sample_paths()["reference"]
    legend = get_legend("chesapeake")
    expected = evaluate_map(local_map, refs, legend, tmp_path / "local")
    with RangeServer(refs[0].parent) as server:
        urls = [server.url(p.name) for p in refs]
        got = evaluate_map(local_map, urls, legend, tmp_path / "remote")
    assert got["confusion"] == expected["confusion"] and got["pixels"] > 0
    assert got["reference"] == sorted(urls)


def test_train_config_keeps_urls(tmp_path: Path) -> None:
    url = "https://example.com/naip/a.tif?sig=x//y"
    cfg = TrainConfig(images=[url, "local.tif"], labels=[url], out=str(tmp_path / "run"))
    absolute = cfg.with_absolute_paths()
    assert absolute.images == [url, str(Path("local.tif").resolve())] and absolute.labels == [url]


# ------------------------------------------------------------------------------- resolution
def test_lists_globs_and_outputs_with_urls(tmp_path: Path) -> None:
    url = "https://example.com/tiles/a*b.tif?sig=1[2]"  # glob characters: not a pattern
    folder = tmp_path / "tiles"
    fake_imagery(folder / "img.tif")
    lcmap_map = fake_imagery(folder / "old_map.tif")
    with rasterio.open(lcmap_map, "r+") as dst:
        dst.update_tags(LCMAP_LEGEND="{}")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{url}\ntiles\n")
    assert find_raster_files([listing], "imagery") == sorted([str(folder / "img.tif"), url])
    assert find_raster_files([url], "imagery") == [url]
    check_not_an_input({"--out": tmp_path / "out.tif"}, [url, str(folder / "img.tif")])  # a URL is no output


def test_vrt_over_urls(cogs: Path, tmp_path: Path) -> None:
    src = cogs / "naip" / "patch-7.tif"
    with RangeServer(cogs) as server:
        vrt = tmp_path / "mosaic.vrt"
        with rasterio.open(src) as ds:
            bands = "".join(
                f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
                f"<SourceFilename>/vsicurl/{server.url('naip/patch-7.tif')}</SourceFilename>"
                f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
                for b in range(1, 5)
            )
            t = ds.transform
            vrt.write_text(
                f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}"><SRS>{ds.crs.to_wkt()}</SRS>'
                f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>{bands}</VRTDataset>"
            )
            expected = ds.read()
        profile = check_raster_file(vrt, "imagery")  # its sources are not local files: not "missing"
        with rasterio.open(vrt) as v:
            assert profile["count"] == 4 and np.array_equal(v.read(), expected)


def _write_item(path: Path, assets: dict, properties: dict | None = None) -> Path:
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": path.stem,
        "geometry": None,
        "properties": {"datetime": "2014-06-01T00:00:00Z", **(properties or {})},
        "links": [],
        "assets": assets,
    }
    path.write_text(json.dumps(item))
    return path


def test_stac_asset_choice_and_hrefs(tmp_path: Path) -> None:
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    (tmp_path / "items").mkdir()
    both = _write_item(
        tmp_path / "items" / "both.json",
        {"image": {"href": "https://x.org/i.tif", "type": cog}, "visual": {"href": "../v.tif", "type": cog}},
    )
    typed = _write_item(
        tmp_path / "items" / "typed.json",
        {"thumb": {"href": "t.png", "type": "image/png"}, "B04": {"href": "file:///data/b04.tif", "type": cog}},
    )
    assert stac_asset_hrefs(both, "imagery") == [str(tmp_path / "v.tif")]  # visual first, relative to the JSON
    assert stac_asset_hrefs(typed, "imagery") == ["/data/b04.tif"]  # else the first GeoTIFF
    with asset_choice("image"):
        assert stac_asset_hrefs(both, "imagery") == ["https://x.org/i.tif"]
        with pytest.raises(LcmapInputError, match="no asset 'image'.*thumb, B04"):
            stac_asset_hrefs(typed, "imagery")
    none = _write_item(tmp_path / "none.json", {"thumb": {"href": "t.png", "type": "image/png"}})
    with pytest.raises(LcmapInputError, match="--stac-asset KEY"):
        stac_asset_hrefs(none, "imagery")
    s3 = _write_item(tmp_path / "s3.json", {"visual": {"href": "s3://bucket/v.tif", "type": cog}})
    with pytest.raises(LcmapInputError, match="https address"):
        stac_asset_hrefs(s3, "imagery")


def test_stac_files_in_the_resolution_path(tmp_path: Path) -> None:
    cog = "image/tiff; application=geotiff"
    img = fake_imagery(tmp_path / "img.tif")
    with rasterio.open(fake_imagery(tmp_path / "map.tif"), "r+") as dst:
        dst.update_tags(LCMAP_LEGEND="{}")  # an lcmap map
    item = _write_item(tmp_path / "item.json", {"visual": {"href": "img.tif", "type": cog}})
    mine = _write_item(tmp_path / "map.stac.json", {"data": {"href": "map.tif", "type": cog}}, {"lcmap:version": "1"})
    plain = _write_item(tmp_path / "plain.json", {"visual": {"href": "map.tif", "type": cog}})  # names a map
    features = [json.loads(p.read_text()) for p in (mine, item, plain)]
    (tmp_path / "search.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (tmp_path / "list.txt").write_text("search.json\n")
    assert find_raster_files([tmp_path / "list.txt"], "imagery") == [str(img)]  # lcmap's own Item skipped
    with pytest.raises(LcmapInputError, match="no Item to read"):
        find_raster_files([mine], "imagery")
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]}))
    with pytest.raises(LcmapInputError, match="--aoi"):
        find_raster_files([aoi], "imagery")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"type": "Catalog", "id": "c", "links": []}))
    with pytest.raises(LcmapInputError, match="search it"):
        find_raster_files([catalog], "imagery")
    assert find_raster_files([item], "imagery") == [str(img)]

"""``lcmap predict --out FOLDER --tile-km N``: COG tiles, their VRT mosaic and STAC Collection.

Small rasters written here (two files with a gap between them and a nodata hole) and a tiny random
U-Net checkpoint, run synchronously; the overview test uses a larger raster with a per-pixel fake
model (the real one would take minutes there).
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from typer.testing import CliRunner

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import LcmapInputError, OutputLockedError
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model
from lcmap.pipeline.prediction import cog, execution, inference, mapfile, tiled_output, tiling
from lcmap.pipeline.prediction.cog import read_category_names
from lcmap.pipeline.prediction.tiling import OutputGrid
from lcmap.pipeline.runs import save_checkpoint
from tests.rasters import UTM17, write_raster
from tests.test_stac import SchemaNotOffline, offline_validator

H, W, SPLIT, GAP = 150, 170, 90, 6  # two files: columns [0, 90) and [96, 170)
HOLE = (slice(10, 30), slice(120, 150))  # imagery nodata (all bands 0)
#: 64 px windows at a 48 px stride, 48 px blocks; 0.1 km tiles are 2 x 2 blocks (96 m)
FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous")
TILES = dict(block_px=48, tile_km=0.1)


def _predict(model, images, out, **options):
    """``lcmap predict`` through the Python API, without the progress bar."""
    return P.predict_map(P.PredictConfig.of(model, images, out, **options), progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _imagery(folder: Path, h: int = H, w: int = W, split: int = SPLIT, gap: int = GAP) -> Path:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    layers = [128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 13), 128 + 80 * np.sin((xx + yy) / 7)]
    data = np.stack([*layers, rng.integers(1, 255, (h, w))]).clip(1, 255).astype(np.uint8)
    data[:, HOLE[0], HOLE[1]] = 0
    for name, c0, c1 in (("left.tif", 0, split), ("right.tif", split + gap, w)):
        write_raster(folder / name, data[:, :, c0:c1], UTM17, from_origin(500_000 + c0, 4_000_000, 1, 1))
    return folder


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("unet", 4, len(target_legend()))
    with torch.no_grad():  # sharpen the random head so that several classes win somewhere
        model.net.segmentation_head[0].weight.mul_(8.0)
    return save_checkpoint(path, model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    images, ckpt = _imagery(root / "images"), _checkpoint(root / "model.ckpt")
    # one COG in one block; the tiles from 48 px blocks: the mosaic must not depend on either
    ref = _predict(ckpt, images, root / "ref" / "map.tif", block_px=4096, confidence=True, **FAST)
    tiled = _predict(ckpt, images, root / "tiles", confidence=True, **TILES, **FAST)
    return {"root": root, "images": images, "ckpt": ckpt, "ref": ref.path, "tiled": tiled}


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _tiles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("tile_r*_c*.tif") if "_confidence" not in p.name)


# ----------------------------------------------------------------------------- the mosaic
def test_mosaic_through_the_vrt_equals_the_single_cog(maps):
    res, ref = maps["tiled"], maps["ref"]
    folder = maps["root"] / "tiles"
    assert res.path == folder / "tiles.vrt" and res.confidence_path == folder / "tiles_confidence.vrt"
    assert res.tiles == len(_tiles(folder)) > 1 and res.tiles_resumed == 0
    with rasterio.open(res.path) as vrt, rasterio.open(ref) as cog_:
        assert (vrt.crs, vrt.transform, vrt.shape, vrt.nodata) == (cog_.crs, cog_.transform, cog_.shape, cog_.nodata)
        codes = vrt.read(1)
        assert np.array_equal(codes, cog_.read(1))  # bit for bit
        n = len(target_legend()) + 1  # a TIFF's colour table has 256 entries, the VRT's the codes used
        assert [vrt.colormap(1)[c] for c in range(n)] == [cog_.colormap(1)[c] for c in range(n)]
        assert vrt.tags()[mapfile.LEGEND_TAG] == cog_.tags()[mapfile.LEGEND_TAG]
    assert len(np.unique(codes[codes > 0])) >= 2 and (codes == 0).any()  # classes, and the gap/hole as nodata
    assert np.array_equal(_read(res.confidence_path), _read(mapfile.confidence_path(ref)))
    assert read_category_names(res.path) == read_category_names(ref) == ["nodata", *target_legend().names]
    assert cog.qml_path(res.path).read_text() == cog.qml_path(ref).read_text()  # QGIS: one layer, the legend
    assert (folder / "tiles.preview.png").is_file()
    assert not (maps["root"] / "tiles.partial").exists()
    assert not [p for p in folder.iterdir() if "tmp" in p.name]


def test_every_tile_is_a_styled_cog_on_the_block_grid(maps):
    from rio_cogeo.cogeo import cog_validate

    folder = maps["root"] / "tiles"
    with rasterio.open(maps["ref"]) as src:
        full, transform = src.read(1), src.transform
    covered = np.zeros((H, W), int)
    for path in _tiles(folder):
        assert cog_validate(str(path), quiet=True)[0], path
        with rasterio.open(path) as src:
            col, row = ~transform * (src.transform.c, src.transform.f)
            r0, c0 = int(round(row)), int(round(col))
            assert np.array_equal(src.read(1), full[r0 : r0 + src.height, c0 : c0 + src.width])
            assert src.colormap(1)[1] == (*target_legend().classes[0].color, 255)
            assert src.tags()[tiled_output.TILE_TAG]
        covered[r0 : r0 + src.height, c0 : c0 + src.width] += 1
        # the window lattice starts 32 px before the map's corner: block edges at -32 + 48 k, tile
        # edges every 2 blocks (-32 + 96 k), or the map's edges
        for start, size, end in ((r0, src.height, H), (c0, src.width, W)):
            assert start == 0 or (start + 32) % 96 == 0
            assert start + size == end or (start + size + 32) % 96 == 0
        assert read_category_names(path) == ["nodata", *target_legend().names]
        assert [e.get("label") for e in ET.parse(cog.qml_path(path)).getroot().iter("paletteEntry")] == list(
            target_legend().names
        )
        assert mapfile.confidence_path(path).is_file()
    assert (covered == 1).all()  # the tiles partition the map


def test_tiles_have_mode_overviews(tmp_path, monkeypatch):
    """Tiles over 512 px have internal overviews (the single COG's writer: mode); a fake per-pixel
    model, as the real one would take minutes over 1.9 Mpx."""

    def fake_proba(model, x):  # class from band 1 only: large patches of one class
        k = ((x[:, 0] + 3) * 0.7).long().clamp(0, 3)
        return torch.nn.functional.one_hot(k, 4).permute(0, 3, 1, 2).float() * 0.9 + 0.025

    monkeypatch.setattr(inference, "predict_proba", fake_proba)
    # tile edges (2 blocks of 448 px from the window lattice): rows 0, 704, 1300; columns 0, 864, 1450
    images = _imagery(tmp_path / "images", h=1300, w=1450, split=700, gap=0)
    opts = {**FAST, "tile_px": 256, "overlap_px": 32}
    res = _predict(_checkpoint(tmp_path / "m.ckpt"), images, tmp_path / "big", block_px=448, tile_km=1, **opts)
    tiles = _tiles(tmp_path / "big")
    assert len(tiles) == res.tiles == 4
    for path in tiles:
        with rasterio.open(path) as src:
            assert max(src.shape) > 512 and src.overviews(1), path
            assert src.colormap(1)[2] == (*target_legend().classes[1].color, 255)
            small = src.read(1, out_shape=(src.height // 2, src.width // 2))  # from the overview
        assert set(np.unique(small)) <= {0, 1, 2, 3, 4}
        assert read_category_names(path)[1:] == list(target_legend().names)


# ---------------------------------------------------------------------------------- resume
def test_a_tile_killed_mid_write_is_redone_and_the_others_are_not_rewritten(maps, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    real_write_cog = cog.write_cog
    written: list[str] = []

    def dying_write_cog(src, dst, **kwargs):
        if len(written) == 2:  # the third tile: killed mid-write, a temporary file left behind
            Path(dst).with_name(f".{Path(dst).name}.tmp-99999.tif").write_bytes(b"II*\0 cut short")
            raise KeyboardInterrupt
        written.append(Path(dst).name)
        return real_write_cog(src, dst, **kwargs)

    monkeypatch.setattr(cog, "write_cog", dying_write_cog)
    with pytest.raises(KeyboardInterrupt, match="2 of 6 tiles"):
        _predict(maps["ckpt"], maps["images"], out, **TILES, **FAST)
    assert [p.name for p in _tiles(out)] == written == ["tile_r000_c000.tif", "tile_r000_c001.tif"]
    assert not (out / "resume.vrt").exists() and not (out / "collection.json").exists()
    assert (out / ".tile_r000_c002.tif.tmp-99999.tif").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    monkeypatch.setattr(cog, "write_cog", real_write_cog)
    ran, rewritten = [], []
    real_predict, real_write_tile = execution.predict_group, tiled_output.write_tile

    def counting(st, job, blocks, given=None):
        for item in real_predict(st, job, blocks, given):
            ran.append(item[0].name)
            yield item

    def counting_write(job, task, owner=None):
        rewritten.append(task.name)
        return real_write_tile(job, task, owner)

    monkeypatch.setattr(execution, "predict_group", counting)
    monkeypatch.setattr(tiled_output, "write_tile", counting_write)
    res = _predict(maps["ckpt"], maps["images"], out, **TILES, **FAST)
    assert res.tiles_resumed == 2 and res.tiles == 6
    assert rewritten == ["tile_r000_c002", "tile_r001_c000", "tile_r001_c001", "tile_r001_c002"]
    assert all(int(name[1:6]) >= 2 for name in ran)  # only tile row 1's blocks: tile r000_c002's were kept
    assert res.blocks_run == len(ran) == 10 and res.blocks_resumed == 10
    for name in ("tile_r000_c000.tif", "tile_r000_c001.tif", "tile_r000_c000.stac.json", "tile_r000_c001.qml"):
        assert (out / name).stat().st_mtime_ns == kept[name], name  # not rewritten
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    assert np.array_equal(_read(res.path), _read(maps["ref"]))


def test_other_parameters_rewrite_every_tile_and_remove_stale_ones(maps, tmp_path):
    out = tmp_path / "params"
    _predict(maps["ckpt"], maps["images"], out, **TILES, **FAST)
    before = {p.name for p in _tiles(out)}
    res = _predict(maps["ckpt"], maps["images"], out, block_px=48, tile_km=0.2, **FAST)  # 4 x 4 blocks
    after = {p.name for p in _tiles(out)}
    assert res.tiles_resumed == 0 and len(after) == res.tiles < len(before)
    assert not [p for p in out.iterdir() if p.name.split(".")[0].removesuffix("_confidence") in before - after]
    assert np.array_equal(_read(res.path), _read(maps["ref"]))


def test_the_output_folder_lock_applies(maps, tmp_path):
    out = tmp_path / "locked"
    with mapfile.lock_partial(tmp_path / "locked.partial", out):
        with pytest.raises(OutputLockedError, match="another lcmap process"):
            _predict(maps["ckpt"], maps["images"], out, **TILES, **FAST)
    assert not out.exists()


# -------------------------------------------------------------------------------------- STAC
def test_stac_collection_lists_every_tile_with_its_bbox(maps):
    import pystac

    folder = maps["root"] / "tiles"
    collection = json.loads((folder / "collection.json").read_text())
    assert collection["type"] == "Collection" and collection["id"] == "tiles"
    links = [link["href"] for link in collection["links"] if link["rel"] == "item"]
    assert sorted(links) == [f"./{p.stem}.stac.json" for p in _tiles(folder)]
    assert collection["assets"]["mosaic"]["href"] == "./tiles.vrt"
    west, south, east, north = collection["extent"]["spatial"]["bbox"][0]
    for path in _tiles(folder):
        item = json.loads(path.with_suffix(".stac.json").read_text())
        assert item["collection"] == "tiles" and item["assets"]["data"]["href"] == path.name
        with rasterio.open(path) as src:
            expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        assert item["bbox"] == pytest.approx(expected, abs=1e-7)
        b = item["bbox"]
        assert west <= b[0] < b[2] <= east and south <= b[1] < b[3] <= north
        classes = item["assets"]["data"]["classification:classes"]
        assert [c["title"] for c in classes if not c.get("nodata")] == list(target_legend().names)
    read = pystac.Collection.from_file(str(folder / "collection.json"))
    assert sorted(i.id for i in read.get_items()) == [p.stem for p in _tiles(folder)]
    try:  # the core schema, offline (tests/test_stac.py)
        offline_validator().validate_core(collection, pystac.STACObjectType.COLLECTION, collection["stac_version"])
    except SchemaNotOffline as exc:
        pytest.skip(f"the STAC core schema {exc} is not bundled with this pystac; no network to fetch it")


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("tile_km", [0, -2.5, math.nan, math.inf])
def test_bad_tile_km_is_a_clear_error(maps, tmp_path, tile_km):
    out = tmp_path / "bad"
    with pytest.raises(LcmapInputError, match=r"--tile-km .*positive number of km"):
        _predict(maps["ckpt"], maps["images"], out, block_px=48, tile_km=tile_km, **FAST)
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_out_a_tif_with_tile_km_is_a_clear_error(maps, tmp_path):
    out = tmp_path / "map.tif"
    with pytest.raises(LcmapInputError, match=r"--out .*map\.tif with --tile-km: give a folder"):
        _predict(maps["ckpt"], maps["images"], out, **TILES, **FAST)
    assert not out.exists()
    from lcmap.cli import app

    args = ["predict", "--model", str(maps["ckpt"]), "--images", str(maps["images"])]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--tile-km", "5"])
    assert result.exit_code == 2 and "give a folder for the tiles" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t"), "--tile-km", "0"])
    assert result.exit_code == 2 and "--tile-km 0.0: the tile side must be" in " ".join(result.output.split())
    assert not out.exists() and not (tmp_path / "t").exists()


def test_tile_side_in_whole_blocks_and_a_projected_crs():
    from rasterio.crs import CRS

    def grid(crs: str, res: float) -> OutputGrid:
        return OutputGrid(CRS.from_user_input(crs).to_wkt(), 0.0, 0.0, res, res, 10, 10, 0, 0, 10, 10)

    assert tiling.tile_side_blocks(10, grid(UTM17, 1.0), 4032) == round(10_000 / 4032)
    assert tiling.tile_side_blocks(0.001, grid(UTM17, 1.0), 4032) == 1  # at least one block
    assert tiling.tile_side_blocks(10, grid("EPSG:2283", 1.0), 4032) == round(10_000 / (4032 * 0.3048006))
    with pytest.raises(LcmapInputError, match="--tile-km needs a map CRS in metres"):
        tiling.tile_side_blocks(10, grid("EPSG:4326", 1e-5), 4032)


@pytest.mark.slow
def test_local_cluster_writes_the_same_tiles(maps, tmp_path):
    """On Dask a task per tile writes it: the same mosaic (~30 s on 2 cores: the cluster's start)."""
    res = _predict(maps["ckpt"], maps["images"], tmp_path / "dask", **TILES, **{**FAST, "scheduler": None})
    assert res.tiles == 6 and np.array_equal(_read(res.path), _read(maps["ref"]))


def test_a_large_single_cog_says_that_tiles_finish_faster(maps, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(P, "SINGLE_COG_MAX_PX", 10_000)  # the test map has more pixels than that
    with caplog.at_level(logging.WARNING, logger="lcmap.pipeline.prediction.predict"):
        _predict(maps["ckpt"], maps["images"], tmp_path / "one.tif", block_px=4096, **FAST)
    assert any("--tile-km" in r.getMessage() and "ONE process" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcmap.pipeline.prediction.predict"):
        _predict(maps["ckpt"], maps["images"], tmp_path / "tiles", **TILES, **FAST)
    assert not any("ONE process" in r.getMessage() for r in caplog.records)


def test_out_a_folder_is_one_cog_inside_it_when_small_and_tiles_when_large(maps, tmp_path, monkeypatch):
    small = _predict(maps["ckpt"], maps["images"], tmp_path / "small", block_px=48, **FAST)
    assert small.path == tmp_path / "small" / "small.tif" and small.tiles == 0
    (tmp_path / "maps.v2").mkdir()  # an existing folder, whatever its name
    assert _predict(maps["ckpt"], maps["images"], tmp_path / "maps.v2", **FAST).path.name == "maps.v2.tif"
    assert _predict(maps["ckpt"], maps["images"], f"{tmp_path / 'new.v3'}/", **FAST).path.parent.name == "new.v3"
    assert _predict(maps["ckpt"], maps["images"], tmp_path / "map.cog", **FAST).path == tmp_path / "map.cog"
    assert np.array_equal(_read(small.path), _read(maps["ref"]))
    monkeypatch.setattr(P, "SINGLE_COG_MAX_PX", 10_000)  # the test map has more pixels than that
    monkeypatch.setattr(P, "DEFAULT_TILE_KM", 0.1)
    large = _predict(maps["ckpt"], maps["images"], tmp_path / "large", block_px=48, **FAST)
    assert large.path == tmp_path / "large" / "large.vrt" and large.tiles == maps["tiled"].tiles
    assert np.array_equal(_read(large.path), _read(maps["ref"]))

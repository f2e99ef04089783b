"""Inputs as provinces come: imagery across UTM zones on one map CRS (``--crs``), blocks planned only
where imagery lies (tiles far apart), progress over the imaged area, BigTIFF for large outputs.

Tiny rasters and a random U-Net checkpoint; ``scheduler="synchronous"``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model
from lcmap.pipeline.prediction import cog, execution
from lcmap.pipeline.runs import save_checkpoint

FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _tile(path: Path, crs: str, x0: float, y0: float, side_px: int, seed: int, res: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 255, (4, side_px, side_px), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=side_px, height=side_px, count=4, dtype="uint8", crs=crs,
        transform=from_origin(x0, y0, res, res), nodata=0,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("unet", 4, len(target_legend()))
    return save_checkpoint(path, model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)


def _at(crs: str, lon: float, lat: float) -> tuple[float, float]:
    xs, ys = transform("EPSG:4326", crs, [lon], [lat])
    return float(xs[0]), float(ys[0])


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory):
    """Two 160 px tiles either side of 84 W (UTM 16N | 17N), 40 m apart on the ground."""
    root = tmp_path_factory.mktemp("zones")
    x16, y16 = _at("EPSG:32616", -84.0012, 35.0)  # west of the zone boundary
    x17, y17 = _at("EPSG:32617", -83.9992, 35.0)  # east of it
    _tile(root / "img" / "a_west.tif", "EPSG:32616", round(x16) - 160, round(y16), 160, 1)
    _tile(root / "img" / "b_east.tif", "EPSG:32617", round(x17), round(y17), 160, 2)
    return {"root": root, "images": root / "img", "ckpt": _checkpoint(root / "m.ckpt")}


def test_imagery_across_utm_zones_gets_one_crs_the_aoi_centroid_zone(two_zones, caplog):
    with caplog.at_level(logging.INFO, logger="lcmap.pipeline.prediction.planning"):
        opts = {k: v for k, v in FAST.items() if k in ("tile_px", "overlap_px", "batch_size")}
        plan = P.plan_prediction(
            P.PredictConfig.of(two_zones["ckpt"], [two_zones["images"]], two_zones["root"] / "m.tif", **opts)
        )
    # no AOI: the imagery's centre lies just east of 84 W -> zone 17 (or west -> 16): one of the two
    centre_zone = CRS.from_wkt(plan.job.grid.crs_wkt).to_epsg()
    assert centre_zone in (32616, 32617)
    assert any("map CRS" in r.getMessage() and "UTM zone" in r.getMessage() for r in caplog.records)
    # a bbox wholly west of the boundary: its centroid's zone, 16
    plan16 = P.plan_prediction(
        P.PredictConfig.of(
            two_zones["ckpt"],
            [two_zones["images"]],
            two_zones["root"] / "m.tif",
            bbox=(-84.004, 34.9975, -83.9985, 35.0005),
        )
    )
    assert CRS.from_wkt(plan16.job.grid.crs_wkt).to_epsg() == 32616
    plan17 = P.plan_prediction(
        P.PredictConfig.of(
            two_zones["ckpt"],
            [two_zones["images"]],
            two_zones["root"] / "m.tif",
            bbox=(-84.0005, 34.9975, -83.996, 35.0005),
        )
    )
    assert CRS.from_wkt(plan17.job.grid.crs_wkt).to_epsg() == 32617


def test_crs_option_warps_every_file_onto_one_grid(two_zones):
    out = two_zones["root"] / "out16" / "map.tif"
    res = P.predict_map(
        P.PredictConfig.of(two_zones["ckpt"], [two_zones["images"]], out, crs="EPSG:32616", **FAST), progress=False
    )
    with rasterio.open(res.path) as src:
        assert src.crs.to_epsg() == 32616
        assert src.res == pytest.approx((1.0, 1.0))
        codes = src.read(1)
        # the east tile (EPSG:32617 on disk) is mapped too: classes on both sides of the seam
        xs, _ys = transform("EPSG:4326", "EPSG:32616", [-84.0], [35.0])
        col = int((xs[0] - src.transform.c) / src.transform.a)
    assert (codes[:, : col - 5] > 0).mean() > 0.3
    assert (codes[:, col + 5 :] > 0).mean() > 0.3


def test_map_pixel_size_is_ground_metres_whatever_file_comes_first(tmp_path):
    """A Web Mercator file sorted first (1.22 "m" pixels in EPSG:3857 units = 1 m on the ground at
    35 N) does not make the UTM map 1.22 m: files already in the map's CRS give its pixel size,
    and without any, the first file's pixel warped onto the map's CRS (GDAL's rule) does."""
    k = 1 / math.cos(math.radians(35.0))
    mx, my = _at("EPSG:3857", -83.99, 35.0)
    _tile(tmp_path / "img" / "a_mercator.tif", "EPSG:3857", mx, my, 160, 3, res=k)
    x17, y17 = _at("EPSG:32617", -83.99, 35.0)
    _tile(tmp_path / "img" / "b_utm17.tif", "EPSG:32617", round(x17), round(y17), 160, 4)
    ckpt = _checkpoint(tmp_path / "m.ckpt")
    opts = {k: v for k, v in FAST.items() if k in ("tile_px", "overlap_px", "batch_size")}
    plan = P.plan_prediction(P.PredictConfig.of(ckpt, [tmp_path / "img"], tmp_path / "m.tif", crs="EPSG:32617", **opts))
    assert (plan.job.grid.res_x, plan.job.grid.res_y) == (1.0, 1.0)
    # no file in the map's CRS: the Mercator pixel warped onto zone 16, ~1 m (not 1.22)
    plan16 = P.plan_prediction(
        P.PredictConfig.of(ckpt, [tmp_path / "img"], tmp_path / "m.tif", crs="EPSG:32616", **opts)
    )
    assert plan16.job.grid.res_x == pytest.approx(1.0, abs=0.01)
    assert plan16.job.grid.res_y == pytest.approx(1.0, abs=0.01)


def test_bad_crs_is_an_input_error(two_zones):
    for bad in ("EPSG:4326", "not-a-crs"):
        with pytest.raises(LcmapInputError):
            P.plan_prediction(
                P.PredictConfig.of(two_zones["ckpt"], [two_zones["images"]], two_zones["root"] / "m.tif", crs=bad)
            )


def test_tiles_far_apart_plan_only_the_blocks_they_touch(tmp_path):
    """Two 300 px tiles 141 km apart (diagonal): a 141 km x 100 km grid, 4 blocks of 512 px to run."""
    img = tmp_path / "img"
    _tile(img / "a.tif", "EPSG:32617", 500_000.0, 4_000_000.0, 300, 1)
    _tile(img / "b.tif", "EPSG:32617", 600_000.0, 3_900_000.0, 300, 2)  # 100 km east, 100 km south
    plan = P.plan_prediction(
        P.PredictConfig.of(
            _checkpoint(tmp_path / "m.ckpt"), [img], tmp_path / "m.tif", block_px=512, tile_px=64, overlap_px=16
        )
    )
    blocks = plan.blocks()
    every = plan.job.blocks()
    assert len(every) > 10_000  # the whole bounding grid
    # each 300 px tile touches at most 2 x 2 blocks of 512 px (here: exactly one each, or a few)
    assert 2 <= len(blocks) <= 8
    grid = plan.job.grid
    progress = execution.Progress(False, blocks, set(), grid, plan.area_wkb)
    assert progress.total_px == pytest.approx(2 * 300 * 300)  # the imaged area, not the blocks' area
    done = execution.Progress(False, blocks, {blocks[0].name}, grid, plan.area_wkb)
    assert 0 < done.done_px < done.total_px


def _small_vrt(tmp_path: Path) -> Path:
    src = tmp_path / "block.tif"
    with rasterio.open(
        src, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32617",
        transform=from_origin(500_000, 4_000_000, 1, 1),
    ) as dst:  # fmt: skip
        dst.write(np.full((1, 64, 64), 2, np.uint8))
    return cog.write_mosaic_vrt(
        tmp_path / "m.vrt", width=64, height=64, crs=CRS.from_epsg(32617),
        transform=from_origin(500_000, 4_000_000, 1, 1), dtype="uint8", nodata=0,
        sources=[cog.VrtSource(str(src), 1, 0, 0, 64, 64)],
    )  # fmt: skip


@pytest.mark.parametrize("threshold,bigtiff", [(0.0, True), (cog.BIGTIFF_THRESHOLD, False)])
def test_large_output_is_written_as_bigtiff(tmp_path, monkeypatch, threshold, bigtiff):
    """Past the size threshold (faked small here) the COG is a BigTIFF (magic 43), else classic (42)."""
    monkeypatch.setattr(cog, "BIGTIFF_THRESHOLD", threshold)
    out = cog.write_cog(_small_vrt(tmp_path), tmp_path / "map.tif")
    magic = out.read_bytes()[:4]
    assert magic in (b"II+\x00", b"II*\x00")
    assert (magic == b"II+\x00") is bigtiff
    cog.validate_cog(out)

"""Border windows computed once (``lcmap.pipeline.prediction.seams``): the plan, and maps made with
seam tasks equal to a map made in one pass, with each model window run exactly once.

Small rasters written here: a two-file mosaic with a gap between the files (windows over the gap
run on their context box) and a tiny random U-Net; blocks of 48 px with one block per task, so
the map has vertical and horizontal seams and 4-way corners.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import lcmap.pipeline.prediction.predict as P
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model
from lcmap.pipeline.prediction import execution, inference, mapfile, seams, tiling
from lcmap.pipeline.runs import save_checkpoint

CRS = "EPSG:32617"
X0, Y0 = 500_000.0, 4_000_000.0
H, W = 140, 180
FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous", confidence=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seams")
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rng = np.random.default_rng(3)
    img = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 13), 128 + 80 * np.sin((xx + yy) / 7),
                    rng.integers(1, 255, (H, W))]).clip(1, 255).astype(np.uint8)  # fmt: skip
    (root / "images").mkdir()
    for name, c0, c1 in (("left.tif", 0, 100), ("right.tif", 105, W)):  # no file over columns [100, 105)
        with rasterio.open(root / "images" / name, "w", driver="GTiff", width=c1 - c0, height=H, count=4,
                           dtype="uint8", crs=CRS, transform=from_origin(X0 + c0, Y0, 1, 1)) as dst:  # fmt: skip
            dst.write(img[:, :, c0:c1])
    torch.manual_seed(0)
    model = build_model("unet", 4, len(target_legend()))
    with torch.no_grad():
        model.net.segmentation_head[0].weight.mul_(8.0)
    ckpt = save_checkpoint(root / "m.ckpt", model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)
    one = P.predict_map(P.PredictConfig.of(ckpt, [root / "images"], root / "one" / "map.tif", block_px=4096, **FAST),
                        progress=False)  # fmt: skip
    return {"root": root, "ckpt": ckpt, "one": one}


def _read(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


def _same_map(a: Path, b: Path) -> None:
    assert np.array_equal(_read(a), _read(b))
    assert np.array_equal(_read(mapfile.confidence_path(a)), _read(mapfile.confidence_path(b)))


# ---------------------------------------------------------------------------- the plan
def _regions(n_rows: int, n_cols: int, block: int, wg: tiling.WindowGrid, shape=(1, 1)) -> list[tiling.Block]:
    blocks = tiling.cut_blocks(wg.height, wg.width, block, wg.row0, wg.col0)
    return [tiling.group_region(g) for g in tiling.block_groups(blocks, *shape)]


def test_every_shared_window_is_in_exactly_one_seam_and_tasks_need_the_seams_they_touch(tmp_path):
    wg = tiling.WindowGrid(64, 16, 300, 400, row0=-20, col0=-30, lattice=True)
    regions = _regions(0, 0, 96, wg, shape=(2, 1))
    items = [[r] for r in regions]
    plan = seams.plan_seams(wg, items, tmp_path, 4)
    touched: dict[tuple[int, int], set[int]] = {}
    for t, r in enumerate(regions):
        for i in wg.rows_touching(r.r0, r.r0 + r.height):
            for j in wg.cols_touching(r.c0, r.c0 + r.width):
                touched.setdefault((i, j), set()).add(t)
    in_seams = [w for s in plan.seams for w in s.windows]
    assert len(in_seams) == len(set(in_seams))  # no window in two seams
    assert set(in_seams) == {w for w, ts in touched.items() if len(ts) >= 2}
    for t in range(len(items)):  # a task takes exactly the shared windows it touches
        mine = {w for w, ts in touched.items() if t in ts and len(ts) >= 2}
        assert {w for s in plan.given[t].seams for w in s.windows} >= mine
        assert all(w in plan.given[t] for w in mine)
    corners = [s for s in plan.seams if len({t for w in s.windows for t in touched[w]}) == 4]
    assert corners  # 4-way corners are seams of their own
    for s in plan.seams:  # a seam's windows in global order; its file named after the first one
        assert list(s.windows) == sorted(s.windows) and Path(s.file).parent == tmp_path
    # each seam goes once every task that needs it has finished
    gone = [s.file for t in range(len(items)) for s in plan.finished(t)]
    assert sorted(gone) == sorted(s.file for s in plan.seams)


def test_wuhan_at_16_workers_runs_each_window_once():
    """The issue's figure, exact from the plan: 8,569 km² at 1 m, tile 512, overlap 64, block 4096,
    tasks for 16 workers (2 per worker thread, as ``predict_map`` asks)."""
    side = round(math.sqrt(8569e6))
    grid = tiling.output_grid("", (500_000.0, 3_300_000.0, 500_000.0 + side, 3_300_000.0 + side), (1.0, 1.0))
    wg = tiling.lattice_windows(grid, 512, 64)
    size = tiling.block_side_px(4096, wg)
    blocks = tiling.cut_blocks(grid.height, grid.width, size, wg.row0, wg.col0)

    def regions(workers: int) -> list[tiling.Block]:
        shape = tiling.task_shape(blocks, workers, size, wg)  # as predict_map groups them
        return [tiling.group_region(g) for g in tiling.block_groups(blocks, *shape)]

    one = seams.shared_model_px_per_map_px(wg, regions(1))
    sixteen = seams.shared_model_px_per_map_px(wg, regions(16))
    assert len(regions(16)) >= 32
    assert sixteen == one <= 1.35
    assert tiling.model_px_per_map_px(wg, regions(16)) > 1.35  # what each task running its border gave


# ---------------------------------------------------------------------------- maps
def test_one_block_per_task_gives_the_same_map_and_runs_each_window_once(data, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "MAX_GROUP", (1, 1))  # every block its own task: seams everywhere
    seam_runs = []
    real_seam = inference.predict_seam

    def recording(st, job, seam, before_rename=None):
        seam_runs.append(seam)
        return real_seam(st, job, seam, before_rename)

    monkeypatch.setattr(execution, "predict_seam", recording)
    present_at_last = []
    real_group = execution.predict_group

    deleted_but_mapped = []

    def group(st, job, blocks, given=None):
        present_at_last[:] = sorted(p.name for p in Path(job.blocks_dir).parent.joinpath("seams").glob("seam_*"))
        maps = Path("/proc/self/maps")
        if maps.exists():  # a deleted seam file still mapped would keep its disk space
            deleted_but_mapped.extend(ln for ln in maps.read_text().splitlines() if "seam_" in ln and "(deleted)" in ln)
        yield from real_group(st, job, blocks, given)

    monkeypatch.setattr(execution, "predict_group", group)
    res = P.predict_map(P.PredictConfig.of(data["ckpt"], [data["root"] / "images"], tmp_path / "m.tif", block_px=48,
                                           **FAST), progress=False)  # fmt: skip
    assert res.blocks == 4 * 5  # 140 x 180 px in 48 px blocks on the lattice (it starts before the corner)
    _same_map(res.path, data["one"].path)
    assert res.windows == data["one"].windows  # each window once (the one-pass map runs each once)
    assert len(seam_runs) >= 9 and sum(len(s.windows) for s in seam_runs) > 0
    # when the last task starts, only the seam files it needs are left
    assert 0 < len(present_at_last) <= 3
    assert deleted_but_mapped == []
    assert not Path(str(tmp_path / "m.tif") + ".partial").exists()


def test_local_cluster_with_seams_gives_the_same_map(data, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "MAX_GROUP", (1, 2))  # planned in this process: many tasks, seams
    opts = {**FAST, "scheduler": None}
    res = P.predict_map(P.PredictConfig.of(data["ckpt"], [data["root"] / "images"], tmp_path / "d.tif", block_px=48,
                                           **opts), progress=False)  # fmt: skip
    _same_map(res.path, data["one"].path)
    assert res.windows == data["one"].windows


def test_a_seam_file_survives_a_crash_and_a_cut_one_is_run_again(data, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "MAX_GROUP", (1, 1))
    out = tmp_path / "r.tif"
    real_write = mapfile.write_block
    written = []

    def failing_write(path, grid, block, codes, conf, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(block.name)
        return real_write(path, grid, block, codes, conf, **kw)

    monkeypatch.setattr(mapfile, "write_block", failing_write)
    config = P.PredictConfig.of(data["ckpt"], [data["root"] / "images"], out, block_px=48, **FAST)
    with pytest.raises(KeyboardInterrupt):
        P.predict_map(config, progress=False)
    seams_dir = Path(str(out) + ".partial") / "seams"
    kept = sorted(seams_dir.glob("seam_*"))
    assert kept
    cut = kept[-1]
    cut.write_bytes(cut.read_bytes()[:5000])  # cut short (as by a full disk, say)
    (seams_dir / f".{kept[-1].name}.123-abcd").write_bytes(b"half")  # a temporary file of a crashed task
    monkeypatch.setattr(mapfile, "write_block", real_write)
    ran = []
    real_seam = inference.predict_seam

    def recording(st, job, seam, before_rename=None):
        stats = real_seam(st, job, seam, before_rename)
        ran.append((Path(seam.file).name, stats["windows"]))
        return stats

    monkeypatch.setattr(execution, "predict_seam", recording)
    res = P.predict_map(config, progress=False)
    _same_map(res.path, data["one"].path)
    by_name = dict(ran)
    reused = [p.name for p in kept[:-1] if p.name in by_name]
    assert reused and all(by_name[n] == 0 for n in reused)  # whole files are used as they are
    assert by_name[cut.name] > 0  # the cut one is run again


def test_a_seam_task_that_outlives_its_run_leaves_no_file(data, tmp_path):
    from lcmap.pipeline.prediction.planning import plan_prediction

    out = tmp_path / "m.tif"
    plan = plan_prediction(P.PredictConfig.of(data["ckpt"], [data["root"] / "images"], out, block_px=48, **FAST))
    st = inference.load_worker_state(plan.job, preloaded=plan.model, imagery=plan.imagery)
    folder = tmp_path / "seams"
    folder.mkdir()
    seam = seams.Seam(((1, 0), (1, 1)), str(folder / "seam_a.f32"), len(plan.job.code_lut), plan.job.windows.tile)
    plan.partial.mkdir()
    with mapfile.lock_partial(plan.partial, out) as run:
        assert execution.run_seam(st, plan.job, seam, run.owner)["windows"] == 2
        assert Path(seam.file).is_file()
        Path(seam.file).unlink()
        run.revoke()  # the scheduler was lost: a seam task still running writes nothing
        execution.run_seam(st, plan.job, seam, run.owner)
    assert list(folder.iterdir()) == []


def test_with_an_aoi_polygon_one_block_per_task_gives_the_one_pass_map(data, tmp_path, monkeypatch):
    """Windows outside the AOI are skipped by every task alike: a seam task's and a group's choice agree."""
    import json

    from rasterio.warp import transform as warp

    corners = [(X0 + 10, Y0 - 135), (X0 + 170, Y0 - 120), (X0 + 60, Y0 - 8)]  # a triangle, lon/lat
    lon, lat = warp(CRS, "EPSG:4326", [c[0] for c in corners], [c[1] for c in corners])
    ring = [[a, b] for a, b in zip(lon, lat, strict=True)] + [[lon[0], lat[0]]]
    aoi = tmp_path / "aoi.geojson"
    polygon = {"type": "Polygon", "coordinates": [ring]}
    aoi.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": polygon}))
    images = [data["root"] / "images"]
    one = P.predict_map(P.PredictConfig.of(data["ckpt"], images, tmp_path / "one.tif", aoi=aoi, block_px=4096, **FAST),
                        progress=False)  # fmt: skip
    monkeypatch.setattr(tiling, "MAX_GROUP", (1, 1))
    many = P.predict_map(P.PredictConfig.of(data["ckpt"], images, tmp_path / "many.tif", aoi=aoi, block_px=48, **FAST),
                         progress=False)  # fmt: skip
    assert many.blocks >= 10  # those touching the triangle
    _same_map(many.path, one.path)
    assert many.windows == one.windows

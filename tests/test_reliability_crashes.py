"""No crash, no hang, and messages that tell the truth (issue 18, parts 4 and 5), run as a user runs them.

Cases (one line each: the test, then what it checks):

- test_count_waits_for_every_block_before_raising: when one block of the counting engine fails, no
  other block is still running when the error reaches the caller (which then closes the files)
- test_evaluate_wrong_legend_never_crashes: ``evaluate`` with a reference legend that does not fit,
  in 5 fresh processes: exit 2 with the message every time, never a segmentation fault
- test_scheduler_that_is_not_dask_is_refused_in_seconds: ``--scheduler`` at a silent TCP server, an
  HTTP-like server and a closed port: one line each within seconds (a real scheduler passes: test_cluster.py)
- test_world_bbox_maps_the_imagery / test_world_bbox_trains: ``--bbox -180 -90 180 90`` maps (trains on)
  the imagery as without a bbox, for predict and train
- test_read_only_output_folder_is_one_line: stats, changes, stac, evaluate into a folder that cannot be
  written: exit 2, one line, nothing written
- test_truncated_map_is_one_line: stats and evaluate on a map cut short: exit 2 naming the file
- test_train_full_disk_leaves_no_run_folder: ENOSPC at the first checkpoint: exit 2, one line, and no run
  folder without a checkpoint is left (the same command runs again)
- test_train_on_all_nodata_imagery_is_one_line: exit 2 naming the imagery, no run folder
- test_label_product_legend_error_names_label_product: the message names --label-product, not --legend
- test_refused_checkpoint_never_advises_weights_only_off: legacy and plain-pickle files with code are
  refused naming the file, nothing runs, PyTorch's advice to turn weights_only off is never passed on
- test_second_predict_is_refused_before_loading_anything: refused while the first holds the lock,
  before the model, the imagery or a Dask cluster are touched
- test_block_is_not_written_after_its_run_ended: a task that outlives its run (token revoked, another
  run's token, or the run's process dead) writes no block file; finished_blocks counts what is on disk
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

import lcmap.pipeline.prediction.predict as P
from lcmap.cli import app
from lcmap.errors import LcmapInputError, OutputLockedError
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model
from lcmap.pipeline.analysis import zonal
from lcmap.pipeline.prediction import mapfile
from lcmap.pipeline.prediction.run_lock import RunOver
from lcmap.pipeline.prediction.scheduler_check import check_scheduler
from lcmap.pipeline.prediction.tiling import Block, OutputGrid
from lcmap.pipeline.runs import load_checkpoint_file, save_checkpoint
from tests.map_rasters import write_map_cog
from tests.rasters import write_raster

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
IMAGE = DATA / "m_3907833_nw_17_1_naip-new.tif"  # 260 x 260, 4 bands, EPSG:26917
NLCD = DATA / "m_3907833_nw_17_1_nlcd.tif"
SAMPLE = REPO / "lcmap" / "geodata" / "sample"
FAST = dict(tile_px=64, overlap_px=16, batch_size=4, block_px=128, scheduler="synchronous")
runner = CliRunner()


def _said(result) -> str:
    return " ".join(result.output.split())


def _one_line_error(result, code: int = 2) -> str:
    """The error the CLI printed (after any log lines): exit ``code``, one ``error:``, no traceback."""
    said = _said(result)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and said.count("error:") == 1, result.output
    return said[said.index("error:") :]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("unet", 4, 4)
    root = tmp_path_factory.mktemp("crashes")
    return save_checkpoint(root / "m.ckpt", model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)


@pytest.fixture(scope="module")
def small_map(tmp_path_factory) -> dict[str, Path]:
    """A 4-class map COG (256 x 256, 1 m), an NLCD-coded raster on its grid, and one zone around it."""
    root = tmp_path_factory.mktemp("small-map")
    rng = np.random.default_rng(1)
    transform = from_origin(500_000, 4_000_256, 1, 1)
    m = write_map_cog(root / "maps" / "map.tif", rng.integers(1, 5, (256, 256)), "EPSG:32617", transform)
    nlcd = write_raster(
        root / "old" / "nlcd.tif", rng.choice([41, 81], (256, 256)).astype(np.uint8), transform=transform
    )
    zones = root / "zones.geojson"
    zones.write_text(
        '{"type":"FeatureCollection","crs":{"type":"name","properties":{"name":"urn:ogc:def:crs:EPSG::32617"}},'
        '"features":[{"type":"Feature","properties":{"name":"a"},"geometry":{"type":"Polygon","coordinates":'
        "[[[500000,4000000],[500256,4000000],[500256,4000256],[500000,4000256],[500000,4000000]]]}}]}"
    )
    return {"map": m, "nlcd": nlcd, "zones": zones}


# --------------------------------------------------------------------------- 4a. no segmentation fault
def test_count_waits_for_every_block_before_raising():
    import dask.array as da

    running, finished = [], []

    def block(a, block_info=None):
        r0 = block_info[0]["array-location"][0][0]
        running.append(r0)
        if r0 == 0:
            raise ValueError("a label code outside its legend")
        time.sleep(0.3)  # still reading when block 0 fails
        finished.append(r0)
        return a

    a = da.zeros((8 * 16, 16), dtype=np.int32, chunks=16).map_blocks(block, dtype=np.int32)
    with pytest.raises(ValueError, match="outside its legend"):
        zonal.count_pairs(a, a, 1, 1, np.ones(a.shape[0]), num_workers=4)
    started = list(running)
    # every block that started had finished when the error came back: the caller may close the files
    assert len(started) > 1 and sorted(started) == sorted([0, *finished])


def test_evaluate_wrong_legend_never_crashes(tmp_path):
    """Before the fix 5 of 16 such runs ended in a segmentation fault (exit 139)."""
    rng = np.random.default_rng(0)
    write_map_cog(
        tmp_path / "map.tif", rng.integers(1, 5, (768, 768)), "EPSG:32617", from_origin(500_000, 4_000_768, 1, 1)
    )
    for k in range(4):  # 30 m strips with codes NLCD does not have
        write_raster(tmp_path / "ref" / f"r{k}.tif", rng.integers(1, 7, (7, 26)).astype(np.uint8),
                     transform=from_origin(500_000, 4_000_768 - k * 192, 30, 30))  # fmt: skip
    code = (
        "import sys\n"
        "from lcmap.errors import LcmapInputError\n"
        "from lcmap.pipeline.analysis.evaluate import evaluate_map\n"
        "try:\n"
        f"    evaluate_map({str(tmp_path / 'map.tif')!r}, {str(tmp_path / 'ref')!r}, 'nlcd', "
        f"{str(tmp_path / 'rep')!r}, block_px=64, progress=False)\n"
        "except LcmapInputError as exc:\n"
        "    print('error:', exc)\n"
        "    sys.exit(2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
        assert "not in legend 'nlcd'" in done.stdout and "--reference-legend" in done.stdout


# ------------------------------------------------------------------------ 4b. a scheduler that is not Dask
@contextmanager
def _server(reply: bytes | None):
    """A TCP server on 127.0.0.1 that accepts and then sends ``reply`` (None: nothing, ever)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for c in held:
            c.close()
        sock.close()


def test_scheduler_that_is_not_dask_is_refused_in_seconds(ckpt, tmp_path):
    with _server(None) as silent:
        t0 = time.monotonic()
        with pytest.raises(LcmapInputError, match="not a Dask scheduler"):
            check_scheduler(silent, timeout_s=1.0)
        assert time.monotonic() - t0 < 3
    reply = b"HTTP/1.0 400 Bad request\r\nServer: BaseHTTP/0.6\r\n\r\n"  # what an HTTP server answers
    with _server(reply) as web:  # Dask read "HTTP/1.0" as a message length: 3.07 EiB
        t0 = time.monotonic()
        out = tmp_path / "map.tif"
        result = runner.invoke(app, ["predict", "--model", str(ckpt), "--images", str(IMAGE), "--out", str(out),
                                     "--scheduler", web, "--device", "cpu"])  # fmt: skip
        said = _one_line_error(result)
        assert time.monotonic() - t0 < 15 and "not a Dask scheduler" in said and "8786" in said
        assert not out.exists() and not Path(str(out) + ".partial").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(LcmapInputError, match="cannot connect"):
        check_scheduler(closed)


# ------------------------------------------------------------------------------ 4c. tracebacks
def test_world_bbox_maps_the_imagery(ckpt, tmp_path):
    plain = P.predict_map(P.PredictConfig.of(ckpt, IMAGE, tmp_path / "plain.tif", **FAST), progress=False).path
    world = P.predict_map(
        P.PredictConfig.of(ckpt, IMAGE, tmp_path / "world.tif", bbox=(-180, -90, 180, 90), **FAST), progress=False
    ).path
    with rasterio.open(plain) as a, rasterio.open(world) as b:
        assert a.transform == b.transform and np.array_equal(a.read(1), b.read(1))


def test_world_bbox_trains(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--images", str(IMAGE), "--labels", str(NLCD), "--legend", "nlcd", "--bbox", "-180", "-90", "180",
         "90", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--patch-px", "64", "--val-patch-px",
         "128", "--accelerator", "cpu", "--model", "unet", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (out / "checkpoints" / "last.ckpt").is_file()


@contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable: chmod for a user, the immutable attribute for root (who writes
    through permissions); skipped where neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder read-only for root here ({done.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_is_one_line(small_map, tmp_path):
    m = small_map["map"]
    with _read_only(tmp_path / "ro") as ro:
        runs = {
            "stats": ["stats", "--map", str(m), "--zones", str(small_map["zones"]), "--field", "name",
                      "--out", str(ro / "stats")],
            "changes": ["changes", "--map", str(m), "--old", str(small_map["nlcd"]), "--old-legend", "nlcd",
                        "--out", str(ro / "changes.tif")],
            "evaluate": ["evaluate", "--map", str(m), "--reference", str(small_map["nlcd"]), "--reference-legend",
                         "nlcd", "--out", str(ro / "report")],
        }  # fmt: skip
        for name, argv in runs.items():
            said = _one_line_error(runner.invoke(app, argv))
            assert str(ro) in said and "cannot be written" in said, name
        assert list(ro.iterdir()) == []
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "map.tif").write_bytes(m.read_bytes())
    with _read_only(maps):
        said = _one_line_error(runner.invoke(app, ["stac", "--map", str(maps / "map.tif")]))
        assert "map.stac.json" in said and "cannot be written" in said
        assert [p.name for p in maps.iterdir()] == ["map.tif"]


def test_truncated_map_is_one_line(small_map, tmp_path):
    data = small_map["map"].read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    for argv in (
        ["stats", "--map", str(cut), "--zones", str(small_map["zones"]), "--field", "name",
         "--out", str(tmp_path / "s")],
        ["evaluate", "--map", str(cut), "--reference", str(small_map["nlcd"]), "--reference-legend", "nlcd",
         "--out", str(tmp_path / "e")],
    ):  # fmt: skip
        said = _one_line_error(runner.invoke(app, argv))
        assert str(cut) in said and "truncated" in said


def _train_argv(out: Path, images: Path = IMAGE) -> list[str]:
    return ["train", "--images", str(images), "--labels", str(NLCD), "--legend", "nlcd", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "2", "--patch-px", "64", "--val-patch-px", "128",
            "--accelerator", "cpu", "--model", "unet", "--out", str(out)]  # fmt: skip


def test_train_full_disk_leaves_no_run_folder(tmp_path, monkeypatch):
    from lcmap.pipeline.training.callbacks import AtomicCheckpointIO

    def full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    out = tmp_path / "new" / "run"
    said = _one_line_error(runner.invoke(app, _train_argv(out)))
    assert "disk is full" in said and "run the same command again" in said and "checkpoint" in said
    assert not (tmp_path / "new").exists()  # no run folder without a checkpoint
    mine = tmp_path / "mine"  # a folder that was there before is kept, and the same command then runs
    mine.mkdir()
    said = _one_line_error(runner.invoke(app, _train_argv(mine)))
    assert "disk is full" in said and mine.is_dir()
    assert not (mine / "checkpoints" / "last.ckpt").exists()  # so the same command runs again (not --resume)


def test_train_on_all_nodata_imagery_is_one_line(tmp_path):
    with rasterio.open(IMAGE) as src:
        profile = {**src.profile, "nodata": 0}
        empty = np.zeros((src.count, src.height, src.width), dtype=src.dtypes[0])
    images = tmp_path / "empty.tif"
    with rasterio.open(images, "w", **profile) as dst:
        dst.write(empty)
    out = tmp_path / "run"
    said = _one_line_error(runner.invoke(app, _train_argv(out, images)))
    assert "no valid pixel" in said and str(images) in said and not out.exists()


# ----------------------------------------------------------------------------- 5b, 5c: the right words
def test_label_product_legend_error_names_label_product(tmp_path):
    argv = _train_argv(tmp_path / "run")
    i = argv.index("--labels")
    argv[i : i + 4] = ["--label-product", f"{NLCD}=worldcover"]  # one product (trained as --labels/--legend)
    said = _one_line_error(runner.invoke(app, argv))
    assert f"--label-product '{NLCD}=worldcover'" in said and "--legend" not in said
    two = [*argv, "--label-product", f"{NLCD}=nlcd"]  # fused products
    said = _one_line_error(runner.invoke(app, two))
    assert f"--label-product '{NLCD}=worldcover'" in said and "--legend" not in said


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refused_checkpoint_never_advises_weights_only_off(tmp_path):
    from lcmap.models.vit_weights import load_vit_weights

    marker = tmp_path / "ran"
    legacy, plain = tmp_path / "legacy.ckpt", tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    plain.write_bytes(pickle.dumps({"state_dict": {}, "x": _Payload(marker)}, protocol=4))
    for path in (legacy, plain):
        with pytest.raises(LcmapInputError) as exc:
            load_checkpoint_file(path)
        text = str(exc.value)
        assert str(path) in text and "weights_only" not in text and "trusted source" not in text
        argv = ["predict", "--model", str(path), "--images", str(IMAGE), "--out", str(tmp_path / "m.tif"),
                "--scheduler", "synchronous"]  # fmt: skip
        said = _one_line_error(runner.invoke(app, argv))
        assert str(path) in said and "weights_only" not in said
        assert "refused" in said or "not an lcmap checkpoint" in said  # pickled code, or not weights
        with pytest.raises(LcmapInputError) as exc:
            load_vit_weights(build_model("paraformer-tiny", 4, 4), path)
        assert "weights_only" not in str(exc.value) and str(path) in str(exc.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- 5d, 5a: one run, one writer
def test_second_predict_is_refused_before_loading_anything(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "map.tif"

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded or connected before the lock was checked")

    monkeypatch.setattr(P, "plan_prediction", must_not_run)
    monkeypatch.setattr(P.execution, "dask_client", must_not_run)
    with mapfile.lock_partial(Path(str(out) + ".partial"), out):
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            P.predict_map(P.PredictConfig.of(ckpt, IMAGE, out), progress=False)  # the default: a local Dask cluster
        said = _one_line_error(runner.invoke(app, ["predict", "--model", str(ckpt), "--images", str(IMAGE),
                                                   "--out", str(out)]))  # fmt: skip
        assert "another lcmap process" in said and time.monotonic() - t0 < 10


def test_block_is_not_written_after_its_run_ended(tmp_path):
    from rasterio.crs import CRS

    grid = OutputGrid(CRS.from_epsg(32617).to_wkt(), 500_000.0, 4_000_032.0, 1.0, 1.0, 32, 32, 0, 0, 32, 32)
    blocks = [Block(0, 0, 0, 0, 16, 16), Block(0, 1, 0, 16, 16, 16)]
    codes = np.ones((16, 16), np.uint8)
    partial = tmp_path / "map.tif.partial"
    (partial / "blocks").mkdir(parents=True)
    out = tmp_path / "map.tif"
    with mapfile.lock_partial(partial, out) as run:
        mapfile.write_block(mapfile.block_path(partial / "blocks", blocks[0]), grid, blocks[0], codes, None, run.owner)
        assert mapfile.finished_blocks(partial / "blocks", [b.name for b in blocks]) == 1
        run.revoke()  # the scheduler was lost: a task still running writes nothing more
        with pytest.raises(RunOver):
            mapfile.write_block(mapfile.block_path(partial / "blocks", blocks[1]), grid, blocks[1], codes, None,
                                run.owner)  # fmt: skip
        owner = run.owner
    with mapfile.lock_partial(partial, out) as second:  # another run took the folder
        with pytest.raises(RunOver, match="ended"):
            mapfile.write_block(mapfile.block_path(partial / "blocks", blocks[1]), grid, blocks[1], codes, None, owner)
        token = second.owner
    Path(token[0]).write_text(f"12345\n{token[1]}\n")  # its token, but its process died (no lock held)
    with pytest.raises(RunOver, match="died"):
        mapfile.write_block(mapfile.block_path(partial / "blocks", blocks[1]), grid, blocks[1], codes, None, token)
    assert sorted(p.name for p in (partial / "blocks").iterdir()) == [
        f"{blocks[0].name}.tif",
        f"{blocks[0].name}.tif.sha256",
    ]

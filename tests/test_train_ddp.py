"""``lcmap train --devices 2 --accelerator cpu``: DDP on 2 CPU processes (gloo), launched from the CLI.

tests/ddp_train_driver.py runs the CLI and records, per process, the patches and validation windows it read
and its confusion matrices; Lightning starts rank 1 by running that file again (as it re-runs ``lcmap
train``). One test trains until SIGTERM, checks, resumes and checks again (two launches of 2 processes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lcmap.geodata.legends import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lcmap" / "geodata" / "sample"
DRIVER = Path(__file__).resolve().parent / "ddp_train_driver.py"
STEPS, BATCH = 4, 2  # steps per epoch (all processes together) and patches per batch


def _aoi_of_five_patches(path: Path) -> Path:
    """Patches 0, 1, 2, 4, 5: five 256 px validation windows, an odd number (shards of 3 and 2)."""
    aoi = json.loads((SAMPLE / "aoi_train.geojson").read_text())
    aoi["features"] = [f for f in aoi["features"] if f["properties"]["patch"] in (0, 1, 2, 4, 5)]
    path.write_text(json.dumps(aoi))
    return path


def _launch(record: Path, *flags: str, sigterm: str | None = None) -> tuple[int, str, float]:
    record.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LCMAP_DDP_RECORD": str(record), "COLUMNS": "200"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "LCMAP_DDP_SIGTERM"):
        env.pop(name, None)
    if sigterm:
        env["LCMAP_DDP_SIGTERM"] = sigterm
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "train", *flags], env=env, capture_output=True, text=True, timeout=420
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split()), time.perf_counter() - t0


def _records(record: Path) -> dict[int, list[dict]]:
    return {
        int(f.stem[len("rank") :]): [json.loads(line) for line in f.read_text().splitlines()]
        for f in sorted(record.glob("rank*.jsonl"))
    }


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _single_process_confusion(run: Path, ckpt_path: Path) -> np.ndarray:
    """The validation confusion matrix of a checkpoint over all windows, in this one process."""
    from lcmap.pipeline.runs import RunFolder, read_checkpoint
    from lcmap.pipeline.training.task import LandCoverTask
    from lcmap.pipeline.training.train import _datamodule, _open_inputs

    folder = RunFolder(run)
    config = folder.read_config()
    ckpt = read_checkpoint(ckpt_path)
    task = LandCoverTask(**ckpt["hyper_parameters"])
    task.load_state_dict(ckpt["state_dict"])
    task.eval()
    dm = _datamodule(config, _open_inputs(config), folder.read_normalization())
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            task.validation_step(dm.on_after_batch_transfer(batch, 0), i)
    return task.val_confusion.compute().numpy()


def test_ddp_two_cpu_processes_one_run_folder_reduced_metrics_own_patches_sigterm_and_resume(tmp_path):
    """2 epochs of 2 steps; rank 1 alone gets SIGTERM after step 3: both stop, rank 0 saves, then --resume."""
    run = tmp_path / "run"
    flags = [
        "--images", str(SAMPLE / "naip"), "--labels", str(SAMPLE / "nlcd"), "--legend", "nlcd",
        "--aoi", str(_aoi_of_five_patches(tmp_path / "aoi.geojson")), "--epochs", "2",
        "--steps-per-epoch", str(STEPS), "--batch-size", str(BATCH), "--patch-px", "64", "--val-patch-px", "256",
        "--model", "paraformer-tiny", "--accelerator", "cpu", "--devices", "2", "--no-progress-bar", "--out", str(run),
    ]  # fmt: skip
    code, out, seconds = _launch(tmp_path / "rec1", *flags, sigterm="1:3")
    print(f"2-process training until SIGTERM: {seconds:.0f} s")
    assert code == 130, out
    assert "DDP: 2 processes" in out and "gloo backend" in out and "SIGTERM: stopping all 2 processes" in out
    assert out.count("interrupted: training interrupted") == 1 and "saved at step 3" in out  # said by rank 0 only
    assert out.count("lcmap train ->") == 1  # rank 1 prints only warnings

    # one run folder, written by rank 0 only: one checkpoint of each kind, one log version, no temporary files
    files = _files(run)
    expected = {"config.yaml", "legend.yaml", "normalization.json", "class_weights.json", "metrics.csv", "loss.png",
                "train.log", "checkpoints/best.ckpt", "checkpoints/last.ckpt"}  # fmt: skip
    assert expected <= files and all(f.startswith("logs/version_0/") for f in files - expected), files
    assert not [f for f in files if Path(f).name.startswith(".") or f.endswith(".tmp")]
    assert (run / "train.log").read_text().count("lcmap train ->") == 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == STEPS // 2  # epoch 1: each step averages one batch of each process

    rec = _records(tmp_path / "rec1")
    assert sorted(rec) == [0, 1]
    # different patches per process: each draws half of the epoch's patches, with its own seed
    patches = {r: [tuple(e["bounds"]) for e in rec[r] if e["kind"] == "train" and e["epoch"] == 0] for r in rec}
    assert len(patches[0]) == len(patches[1]) == math.ceil(STEPS * BATCH / 2)
    assert not set(patches[0]) & set(patches[1])
    # validation (epoch 1): every window on exactly one process (3 + 2 of 5), the confusion matrices summed
    windows = {r: [tuple(e["bounds"]) for e in rec[r] if e["kind"] == "val"] for r in rec}
    assert sorted(len(w) for w in windows.values()) == [2, 3] and not set(windows[0]) & set(windows[1])
    ends = {r: [e for e in rec[r] if e["kind"] == "val_end"] for r in rec}
    assert [len(ends[0]), len(ends[1])] == [1, 1]  # stopped in epoch 2 before its validation
    own = [np.array(ends[r][0]["own"]) for r in (0, 1)]
    summed = np.array(ends[0][0]["summed"])
    assert (np.array(ends[1][0]["summed"]) == summed).all() and (own[0] + own[1] == summed).all()
    assert own[0].sum() > 0 and own[1].sum() > 0
    # the same weights (best.ckpt, saved at that validation) over the same 5 windows in one process
    single = _single_process_confusion(run, run / "checkpoints" / "best.ckpt")
    assert summed.sum() == single.sum() and np.abs(summed - single).sum() <= 1e-4 * single.sum(), (summed, single)
    from lcmap.pipeline.metrics import scores_from_confusion

    names = ["water", "tree canopy", "low vegetation", "built-up"]
    miou = scores_from_confusion(summed.astype(np.int64), names)["miou"]
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines() if r]
    logged = [row[rows[0].index("val_miou")] for row in rows[1:]]
    assert float(next(v for v in logged if v)) == pytest.approx(miou, rel=1e-6)  # that of the summed matrix

    # --resume on 2 processes continues from last.ckpt (step 3), in the same folder
    code, out, _ = _launch(tmp_path / "rec2", "--out", str(run), "--resume", "--devices", "2", "--no-progress-bar")
    assert code == 0, out
    assert out.count("run written to") == 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    files = _files(run)
    assert {f for f in files if f.startswith("checkpoints/")} == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    assert {Path(f).parts[1] for f in files if f.startswith("logs/")} == {"version_0", "version_1"}
    assert (run / "train.log").read_text().count("lcmap train ->") == 2
    rec2 = _records(tmp_path / "rec2")
    resumed = {r: [tuple(e["bounds"]) for e in rec2[r] if e["kind"] == "train"] for r in rec2}
    assert sorted(rec2) == [0, 1] and all(e["epoch"] == 1 for r in rec2 for e in rec2[r] if e["kind"] == "train")
    assert not set(resumed[0]) & set(resumed[1]) and not set(resumed[0]) & set(patches[0])
    assert all(len([e for e in rec2[r] if e["kind"] == "val_end"]) == 1 for r in (0, 1))  # epoch 2 validated


def test_validation_shards_count_each_window_once():
    """Every window on exactly one process; a process left without one validates a window unscored."""
    from lcmap.pipeline.training.datamodule import LandCoverDataModule

    dm = LandCoverDataModule(None, None, None, 32, 1, 1, [0.0], [1.0], augment=False)
    dm.train_dataset = dm.val_dataset = object()  # type: ignore[assignment]
    windows = [(k,) for k in range(5)]

    def shard(rank: int, world: int) -> tuple[list, bool]:
        dm.val_windows = windows[:]
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=False, accelerator=None)
        return list(dm.val_dataloader().sampler), dm._val_unscored

    shards = [shard(r, 2) for r in (0, 1)]
    assert [s for s, _ in shards] == [windows[0::2], windows[1::2]] and not any(u for _, u in shards)
    windows = [(0,)]
    assert shard(0, 2) == ([(0,)], False) and shard(1, 2) == ([(0,)], True)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    out = dm.on_after_batch_transfer({"image": torch.zeros(1, 1, 4, 4), "mask": mask}, 0)
    assert (out["mask"] == IGNORE_INDEX).all()  # rank 1's stand-in window scores nothing

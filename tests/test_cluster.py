"""``lcmap predict`` on a real Dask cluster started the way users start one (``dask scheduler`` +
``dask worker`` processes on 127.0.0.1), and what happens when parts of it go away; Ctrl-C;
``--precision bf16`` (CUDA only).

The map on a cluster must be bit-identical to ``scheduler="synchronous"``, also after a worker
is SIGKILLed mid-run. A scheduler that goes away, or cannot be reached, gives one message; after
a lost scheduler the message counts the blocks on disk, and the workers left running write no
further block.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model
from lcmap.pipeline.runs import save_checkpoint
from tests.rasters import fake_imagery

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(tile_px=64, overlap_px=16, batch_size=4, block_px=48, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (random free ports)."""

    def __init__(self, n_workers: int):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.scheduler = subprocess.Popen(
            [*dask, "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    self.address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--name",
                    str(k),
                    "--memory-limit",
                    "0",
                ],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for k in range(n_workers)
        ]
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(n_workers, timeout=90)

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    fake_imagery(root / "images" / "a.tif", h=200, w=120, seed=1)
    fake_imagery(root / "images" / "b.tif", h=200, w=100, x0=500_120, seed=2)
    torch.manual_seed(0)
    model = build_model("unet", 4, 4)
    ckpt = save_checkpoint(root / "m.ckpt", model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)
    ref = P.predict_map(
        P.PredictConfig.of(ckpt, [root / "images"], root / "ref" / "map.tif", scheduler="synchronous", **OPTS),
        progress=False,
    ).path
    return {"root": root, "ckpt": ckpt, "images": [root / "images"], "ref": ref}


@pytest.fixture
def cluster():
    c = Cluster(2)
    yield c
    c.close()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _when_first_block(out: Path, action, timeout_s: float = 120) -> threading.Thread:
    """Run ``action()`` as soon as the first block file of ``out`` exists (in a thread)."""
    blocks = Path(str(out) + ".partial") / "blocks"

    def watch():
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if blocks.is_dir() and any(blocks.glob("r*_c*.tif")):
                action()
                return
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_cluster_map_is_identical_to_synchronous(data, cluster, tmp_path):
    res = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], tmp_path / "map.tif", scheduler=cluster.address, **OPTS),
        progress=False,
    )
    assert res.blocks_run == res.blocks > 4
    assert np.array_equal(_read(res.path), _read(data["ref"]))


def test_cluster_survives_a_worker_killed_mid_run(data, cluster, tmp_path):
    out = tmp_path / "map.tif"
    killed = []

    def kill():
        if not out.exists():
            cluster.workers[0].send_signal(signal.SIGKILL)
            killed.append(time.monotonic())

    watcher = _when_first_block(out, kill)
    res = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], out, scheduler=cluster.address, **OPTS), progress=False
    )
    watcher.join(timeout=5)
    assert killed and cluster.workers[0].wait(timeout=10) == -signal.SIGKILL
    assert np.array_equal(_read(res.path), _read(data["ref"]))


def test_cluster_scheduler_lost_mid_run_keeps_blocks_and_says_how_to_resume(data, cluster, tmp_path):
    out = tmp_path / "map.tif"
    watcher = _when_first_block(out, lambda: cluster.scheduler.send_signal(signal.SIGKILL))
    with pytest.raises(LcmapInputError) as exc:
        P.predict_map(
            P.PredictConfig.of(data["ckpt"], data["images"], out, scheduler=cluster.address, **OPTS), progress=False
        )
    watcher.join(timeout=5)
    msg = str(exc.value)
    assert "scheduler" in msg and "went away" in msg and "resume" in msg
    partial = Path(str(out) + ".partial")
    assert any((partial / "blocks").glob("r*_c*.tif")) and not out.exists()
    # the count said is what is on disk (blocks with their record), and the surviving workers,
    # still running their tasks, write nothing after predict_map returned
    on_disk = sorted(p.name for p in (partial / "blocks").iterdir())
    kept = int(re.search(r"(\d+) of (\d+) blocks finished are kept", msg).group(1))
    assert kept == sum(1 for n in on_disk if n.endswith(".tif.sha256")) > 0
    time.sleep(3)
    assert sorted(p.name for p in (partial / "blocks").iterdir()) == on_disk
    # resuming synchronously finishes the same map
    res = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], out, scheduler="synchronous", **OPTS), progress=False
    )
    assert res.blocks_resumed > 0 and np.array_equal(_read(res.path), _read(data["ref"]))


def test_cluster_unreachable_scheduler_fails_fast_and_leaves_nothing(data, tmp_path):
    out = tmp_path / "map.tif"
    t0 = time.monotonic()
    with pytest.raises(LcmapInputError, match="cannot connect"):
        P.predict_map(
            P.PredictConfig.of(data["ckpt"], data["images"], out, scheduler=f"tcp://127.0.0.1:{_free_port()}", **OPTS),
            progress=False,
        )
    assert time.monotonic() - t0 < 30
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_ctrl_c_on_predict_says_what_was_kept_and_exits_130(data, tmp_path):
    out = tmp_path / "map.tif"
    cmd = [sys.executable, "-m", "lcmap.cli", "predict", "--model", str(data["ckpt"]), "--out", str(out),
           "--images", str(data["images"][0]), "--tile-px", "64", "--overlap-px", "16", "--block-px", "48",
           "--scheduler", "synchronous", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _when_first_block(out, lambda: proc.send_signal(signal.SIGINT)).join(timeout=120)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "kept in" in err and "resume" in err and "Traceback" not in err


def test_bf16_on_cpu_is_refused_with_a_message(data, tmp_path):
    with pytest.raises(LcmapInputError, match="bf16"):
        P.predict_map(
            P.PredictConfig.of(
                data["ckpt"], data["images"], tmp_path / "m.tif", scheduler="synchronous", precision="bf16", **OPTS
            ),
            progress=False,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_map_mostly_agrees_with_float32(data, tmp_path):
    gpu = {**OPTS, "device": "cuda"}
    a = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], tmp_path / "a.tif", scheduler="synchronous", **gpu),
        progress=False,
    ).path
    b = P.predict_map(
        P.PredictConfig.of(
            data["ckpt"], data["images"], tmp_path / "b.tif", scheduler="synchronous", precision="bf16", **gpu
        ),
        progress=False,
    ).path
    assert (_read(a) == _read(b)).mean() > 0.95

"""Nothing lost, nothing silently wrong: training, run folders, checkpoints, Dask security.

Cases (one line each, with the test):

- a fresh ``lcmap train`` checkpoint needs no type beyond the weights-only allowlist: test_fresh_checkpoint_is_plain
- ``lcmap predict --model`` refuses a checkpoint carrying pickled code (exit 2, nothing run):
  test_predict_refuses_pickled_code
- ``lcmap train --resume`` refuses a last.ckpt carrying pickled code (exit 2, nothing run, run kept):
  test_train_resume_refuses_pickled_code
- the loader Dask workers use and Lightning's resume reader refuse it too: test_worker_and_lightning_loaders_refuse
- a checkpoint with NaN/inf weights (or a NaN/inf/0 norm_std) is refused at load, naming the file and tensor
  (exit 2, no map): test_checkpoint_with_non_finite_weights_is_refused
- non-UTF-8 ``--config`` -> one line naming the file, exit 2: test_config_not_utf8
- a run folder's config.yaml not UTF-8 or not YAML -> exit 2 for predict and train --resume (not ignored):
  test_run_folder_config_unreadable
- ``lcmap train --out`` on a folder that cannot be created -> one line, exit 2: test_train_out_not_writable
- ``lcmap train --out`` whose files would overwrite the user's --config/--legend YAML there, or --out = an input
  file: exit 2, nothing written: test_train_out_holding_an_input_is_refused
- two ``lcmap train`` on one --out: the second is refused with the first's pid (exit 2), the lock of a
  SIGKILLed run does not block the next: test_second_train_on_one_out_is_refused_and_a_dead_holder_is_not
- a train failing on bad input leaves no folder it created, keeps one that existed: test_bad_input_leaves_nothing
- SIGTERM during training saves last.ckpt at the step the message names: test_sigterm_saves_the_step_it_names
- SIGTERM before training: interrupted, no folder left: test_sigterm_before_training_leaves_nothing
- ``lcmap train`` in a subprocess, SIGTERM after the first checkpoint: exit 130, message, step, --resume
  continues (slow): test_sigterm_cli_subprocess_then_resume
- ``lcmap demo`` rerun on an existing run says --resume; an interrupted demo suggests ``lcmap demo --resume``:
  test_demo_rerun_and_interrupt_say_demo_resume
- ``lcmap demo --resume`` continues the interrupted training, then maps and scores (slow):
  test_demo_resume_continues_then_maps
- ``--scheduler tls://`` takes its certificates from Dask's config and connects; without them exit-2 message;
  remote ``tcp://`` warns: test_tls_scheduler_security, test_tls_without_config_is_refused
- ``lcmap evaluate`` with one class: kappa null / "n/a", never "-0.000": tests/test_cli.py::
  test_evaluate_undefined_kappa_prints_na (already there; checked again here through the CLI): test_single_class_kappa
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

from lcmap.cli import app
from lcmap.errors import LcmapInputError, TrainingInterrupted, UnsafeCheckpointError
from lcmap.pipeline.runs import RunFolder
from lcmap.pipeline.training.train import TrainConfig, run_train

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _says(output: str, *parts: object) -> bool:
    """Whether ``output`` holds each of ``parts``, ignoring white space (the console wraps long paths)."""
    squashed = "".join(output.split())
    return all("".join(str(p).split()) in squashed for p in parts)


def _sample_config(out: Path, **kw) -> TrainConfig:
    base = dict(
        images=[str(SAMPLE / "naip")],
        labels=[str(SAMPLE / "nlcd")],
        legend="nlcd",
        aoi=str(SAMPLE / "aoi_train.geojson"),
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_px=64,
        val_patch_px=256,
        accelerator="cpu",
        progress_bar=False,
        model="unet",
        out=str(out),
    )
    base.update(kw)
    return TrainConfig(**base)


def _train_flags(out: Path, **kw) -> list[str]:
    """``lcmap train`` flags of a tiny run on the embedded sample."""
    opts = {
        "--images": str(SAMPLE / "naip"),
        "--labels": str(SAMPLE / "nlcd"),
        "--legend": "nlcd",
        "--aoi": str(SAMPLE / "aoi_train.geojson"),
        "--epochs": "1",
        "--steps-per-epoch": "2",
        "--batch-size": "2",
        "--patch-px": "64",
        "--val-patch-px": "256",
        "--accelerator": "cpu",
        "--model": "unet",
        "--out": str(out),
    }
    opts.update(kw)
    return ["train", *[x for kv in opts.items() for x in kv]]


class _Payload:
    """Pickles as a call to os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint shaped like lcmap's, with a pickled os.system call in its hyper-parameters."""
    ckpt = {
        "state_dict": {"model.w": torch.zeros(2)},
        "global_step": 5,
        "hyper_parameters": {
            "model_name": "unet",
            "in_channels": 4,
            "legend": {},
            "norm_mean": [0.0] * 4,
            "norm_std": [1.0] * 4,
            "payload": _Payload(marker),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return run_train(_sample_config(tmp_path_factory.mktemp("rel") / "run"))


# ------------------------------------------------------------------------------ 1. checkpoints
def test_fresh_checkpoint_is_plain(tiny_run: Path) -> None:
    from lcmap.pipeline.runs import CHECKPOINT_SAFE_GLOBALS, load_checkpoint_file

    for name in ("last.ckpt", "best.ckpt"):
        path = tiny_run / "checkpoints" / name
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        ckpt = load_checkpoint_file(path)
        assert {"state_dict", "optimizer_states", "callbacks", "hyper_parameters"} <= set(ckpt)


def test_predict_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    result = runner.invoke(
        app,
        ["predict", "--model", str(ckpt), "--images", str(SAMPLE / "naip"), "--out", str(tmp_path / "m.tif"),
         "--scheduler", "synchronous"],
    )  # fmt: skip
    out = _one_line(result.output)
    assert result.exit_code == 2, out
    assert _says(out, ckpt, "not a plain checkpoint", "system")
    assert not marker.exists() and not (tmp_path / "m.tif").exists()


def test_train_resume_refuses_pickled_code(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "PWNED"
    _hostile_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume"])
    out = _one_line(result.output)
    assert result.exit_code == 2, out
    assert _says(out, run / "checkpoints" / "last.ckpt", "not a plain checkpoint")
    assert not marker.exists()
    assert (run / "config.yaml").is_file()  # an existing run folder is never removed


def test_worker_and_lightning_loaders_refuse(tmp_path: Path) -> None:
    from lcmap.pipeline.runs import load_trained_model
    from lcmap.pipeline.training.callbacks import AtomicCheckpointIO

    marker = tmp_path / "PWNED"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="not a plain checkpoint"):
        load_trained_model(ckpt)  # what inference.worker_state calls on each Dask worker
    with pytest.raises(UnsafeCheckpointError, match="not a plain checkpoint"):
        AtomicCheckpointIO().load_checkpoint(ckpt)  # trainer.fit(ckpt_path=...) on --resume
    assert not marker.exists()
    # a truncated file is "not readable", not "unsafe"
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(LcmapInputError, match="not a readable checkpoint"):
        load_trained_model(tmp_path / "cut.ckpt")


@pytest.mark.parametrize(
    ("where", "value"),
    [("weight", float("nan")), ("weight", float("inf")), ("weight", float("-inf")), ("norm_std", 0.0)],
)
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path: Path, where: str, value: float) -> None:
    """A checkpoint holding NaN/inf weights (a diverged run) maps every pixel as class 0 ("water"):
    refused at load, naming the file and the tensor (exit 2, no map); a NaN/inf/0 std likewise."""
    from lcmap.geodata.legends import target_legend
    from lcmap.models import build_model
    from lcmap.pipeline.runs import load_trained_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("unet", 4, 4)
    std = [60.0] * 4
    if where == "weight":
        with torch.no_grad():
            model.net.segmentation_head[0].weight[0, 0, 0, 0] = value
    else:
        std[2] = value
    ckpt = save_checkpoint(tmp_path / "diverged.ckpt", model, "unet", target_legend(), [128.0] * 4, std)
    with pytest.raises(LcmapInputError, match=r"diverged\.ckpt holds NaN or infinite values"):
        load_trained_model(ckpt)
    args = ["predict", "--model", str(ckpt), "--images", str(SAMPLE / "naip" / "patch-0.tif")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m.tif"), "--scheduler", "synchronous"])
    out = _one_line(result.output)
    assert result.exit_code == 2, out
    assert _says(out, ckpt, "segmentation_head.0.weight" if where == "weight" else "norm_std", "refused")
    assert not (tmp_path / "m.tif").exists()


# ------------------------------------------------------------------------------ 3. YAML files
def test_config_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"epochs: 2\nlegend: caf\xe9\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    out = _one_line(result.output)
    assert result.exit_code == 2 and _says(out, config, "not UTF-8"), out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content,what", [(b"epochs: 2\nlegend: caf\xe9\n", "not UTF-8"), (b"epochs: [2\nlegend: x\n", "not valid YAML")]
)
def test_run_folder_config_unreadable(tmp_path: Path, content: bytes, what: str) -> None:
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.last_ckpt.write_bytes(b"")
    run.config_yaml.write_bytes(content)
    result = runner.invoke(
        app, ["predict", "--model", str(run.path), "--images", str(SAMPLE / "naip"), "--out", str(tmp_path / "m.tif")]
    )
    out = _one_line(result.output)
    assert result.exit_code == 2 and _says(out, run.config_yaml, what), out
    result = runner.invoke(app, ["train", "--out", str(run.path), "--resume"])
    out = _one_line(result.output)
    assert result.exit_code == 2 and _says(out, run.config_yaml, what), out


# ------------------------------------------------------------------------------ 4. run folder
def test_train_out_not_writable(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permissions: use a file system that refuses folders
        out = Path("/sys/lcmap-test-run")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "run"
    try:
        result = runner.invoke(app, _train_flags(out))
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    out_text = _one_line(result.output)
    assert result.exit_code == 2 and _says(out_text, "cannot create or write the run folder", out)
    assert "Traceback" not in result.output and not out.exists()


def test_train_out_holding_an_input_is_refused(tmp_path: Path) -> None:
    """RUN_DIR's files (config.yaml, legend.yaml, ...) are not written over the user's --config or
    --legend YAML kept there, and --out equal to an input file is refused: exit 2, inputs untouched."""
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    legend = run / "legend.yaml"
    legend.write_text(
        yaml.safe_dump({"name": "mine", "classes": [{"code": 41, "name": "forest", "target": "tree canopy"}]})
    )
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump({"model": "unet", "epochs": 1}))
    cases = (
        (_train_flags(run, **{"--legend": str(legend)}), "legend.yaml"),
        (["train", "--config", str(config), *_train_flags(run)[1:]], "config.yaml"),
        (_train_flags(tmp_path / "labels.tif", **{"--labels": str(tmp_path / "labels.tif")}), "labels.tif"),
    )
    before = {p: p.read_bytes() for p in (legend, config)}
    for args, name in cases:
        result = runner.invoke(app, args)
        out = _one_line(result.output)
        assert result.exit_code == 2, out
        assert _says(out, "is also an input", name)
    assert {p: p.read_bytes() for p in (legend, config)} == before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "legend.yaml"]


def _hold_run_lock(run: Path) -> subprocess.Popen:
    """A separate process holding RUN_DIR's lock (as a running ``lcmap train`` does) until killed."""
    code = (
        "import time; from pathlib import Path; from lcmap.pipeline.folder_lock import hold_folder_lock\n"
        f"with hold_folder_lock(Path({str(run)!r}), 'run folder'):\n"
        "    print('locked', flush=True); time.sleep(120)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_train_on_one_out_is_refused_and_a_dead_holder_is_not(tmp_path: Path) -> None:
    """Two ``lcmap train`` on one --out: the second is refused at once with the first's pid (exit 2),
    writing nothing there (before: both succeeded into one mixed folder); once the holder is dead
    (SIGKILL: its .lock file and pid stay behind) the next run trains, and removes the lock file."""
    run = tmp_path / "run"
    holder = _hold_run_lock(run)
    try:
        result = runner.invoke(app, _train_flags(run))
        out = _one_line(result.output)
        assert result.exit_code == 2, out
        assert _says(out, f"run folder {run} is being written by another lcmap process (pid {holder.pid})")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").read_text() == str(holder.pid)  # stale: its process is gone
    assert run_train(_sample_config(run)) == run
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / ".lock").exists()


def test_bad_input_leaves_nothing(tmp_path: Path) -> None:
    new = tmp_path / "new" / "deeper" / "run"
    result = runner.invoke(app, _train_flags(new, **{"--legend": "worldcover"}))
    assert result.exit_code == 2 and "worldcover" in result.output
    assert not (tmp_path / "new").exists()  # the parents it created are gone too
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    result = runner.invoke(app, _train_flags(existing, **{"--legend": "worldcover"}))
    assert result.exit_code == 2
    assert (existing / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ 5. interrupts
def test_sigterm_saves_the_step_it_names(tmp_path: Path, monkeypatch) -> None:
    from lcmap.pipeline.training.task import LandCoverTask

    def sigterm(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LandCoverTask, "on_train_batch_end", sigterm, raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        run_train(_sample_config(tmp_path / "run", epochs=3))
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert err.value.global_step == saved == 3  # not step 2, the end of epoch 1
    assert f"saved at step {saved}" in str(err.value) and "--resume" in str(err.value)


def test_sigterm_before_training_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import lcmap.pipeline.training.train as train

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(train, "_normalization", sigterm)
    with pytest.raises(TrainingInterrupted) as err:
        run_train(_sample_config(tmp_path / "run"))
    assert err.value.global_step is None and "before its first checkpoint" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_cli_subprocess_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-c", "from lcmap.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd + _train_flags(run, **{"--epochs": "3"}), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    output = _one_line(proc.communicate(timeout=300)[0])
    assert proc.returncode == 130, output
    saved = torch.load(last, weights_only=True)["global_step"]
    assert _says(output, f"interrupted: training interrupted; {last} saved at step {saved}.")
    assert saved >= 2 and _says(output, f"lcmap train --out {run} --resume")
    done = subprocess.run(cmd + ["train", "--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 6  # 3 epochs x 2 steps


def test_demo_rerun_and_interrupt_say_demo_resume(tmp_path: Path, monkeypatch) -> None:
    import lcmap.pipeline.training.train as train
    from lcmap.pipeline.demo import DEMO_MARKER

    out = tmp_path / "demo"
    RunFolder(out / "run").checkpoints.mkdir(parents=True)
    RunFolder(out / "run").last_ckpt.write_bytes(b"")
    (out / DEMO_MARKER).write_text("")  # a folder an earlier demo made
    result = runner.invoke(app, ["demo", "--out", str(out)])
    text = _one_line(result.output)
    assert result.exit_code == 2 and _says(text, f"lcmap demo --out {out} --resume"), text

    def interrupted(config):
        raise TrainingInterrupted(Path(config.out), 7)

    monkeypatch.setattr(train, "run_train", interrupted)
    result = runner.invoke(app, ["demo", "--out", str(out), "--resume"])
    text = _one_line(result.output)
    assert result.exit_code == 130 and _says(text, "saved at step 7", f"lcmap demo --out {out} --resume"), text


@pytest.mark.slow
def test_demo_resume_continues_then_maps(tmp_path: Path, monkeypatch) -> None:
    from lcmap.pipeline.demo import run_demo
    from lcmap.pipeline.training.task import LandCoverTask

    def sigterm(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "demo"
    monkeypatch.setattr(LandCoverTask, "on_train_batch_end", sigterm, raising=False)
    with pytest.raises(TrainingInterrupted, match="lcmap demo --out .* --resume"):
        run_demo(out, epochs=2, steps_per_epoch=2, progress=False)
    monkeypatch.undo()
    metrics = run_demo(out, resume=True, progress=False)
    assert torch.load(out / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (out / "map.tif").is_file() and metrics["pixels"] > 0


# ------------------------------------------------------------------------------ 2. Dask TLS
def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and one certificate it signed (openssl), for scheduler, worker and client."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    run = lambda *a: subprocess.run([openssl, *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=lcmap-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1")
    return ca, cert, key


def test_tls_scheduler_security(tmp_path: Path, caplog) -> None:
    import dask
    from distributed import Client, LocalCluster, Security

    from lcmap.pipeline.prediction.dask_security import scheduler_security

    ca, cert, key = _certificates(tmp_path)
    server = Security(
        tls_ca_file=str(ca), tls_scheduler_cert=str(cert), tls_scheduler_key=str(key),
        tls_worker_cert=str(cert), tls_worker_key=str(key), tls_client_cert=str(cert), tls_client_key=str(key),
        require_encryption=True,
    )  # fmt: skip
    with LocalCluster(n_workers=1, processes=False, protocol="tls://", security=server, dashboard_address=None) as lc:
        address = lc.scheduler_address
        assert address.startswith("tls://")
        config = {
            "distributed.comm.tls.ca-file": str(ca),
            "distributed.comm.tls.client.cert": str(cert),
            "distributed.comm.tls.client.key": str(key),
        }
        with dask.config.set(config):
            security = scheduler_security(address)
            assert security.require_encryption and security.tls_client_cert == str(cert)
            with Client(address, security=security, timeout="10s") as client:
                assert len(client.scheduler_info()["workers"]) == 1
        with dask.config.set({**config, "distributed.comm.tls.client.key": str(tmp_path / "missing.pem")}):
            with pytest.raises(LcmapInputError, match="missing.pem"):
                scheduler_security(address)
    caplog.clear()
    assert scheduler_security("tcp://127.0.0.1:8786") is None and not caplog.records
    scheduler_security("tcp://192.0.2.1:8786")  # TEST-NET address: another machine
    assert any("neither encrypted nor authenticated" in r.getMessage() for r in caplog.records)


def test_tls_without_config_is_refused(tmp_path: Path, tiny_run: Path) -> None:
    import dask

    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        result = runner.invoke(
            app,
            ["predict", "--model", str(tiny_run), "--images", str(SAMPLE / "naip"), "--out", str(tmp_path / "m.tif"),
             "--aoi", str(SAMPLE / "aoi_heldout.geojson"), "--scheduler", "tls://127.0.0.1:1"],
        )  # fmt: skip
    out = _one_line(result.output)
    assert result.exit_code == 2 and "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in out, out
    assert not (tmp_path / "m.tif").exists()


# ------------------------------------------------------------------------------ 6. kappa
def test_single_class_kappa(tmp_path: Path) -> None:
    def tif(path: Path) -> Path:
        profile = dict(driver="GTiff", width=5, height=3, count=1, dtype="uint8", nodata=0, crs="EPSG:32617",
                       transform=from_origin(500_000, 4_000_000, 1, 1))  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.full((3, 5), 3, np.uint8), 1)
        return path

    out = tmp_path / "report"
    result = runner.invoke(
        app,
        ["evaluate", "--map", str(tif(tmp_path / "m.tif")), "--reference", str(tif(tmp_path / "r.tif")),
         "--reference-legend", "4class", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["kappa"] is None
    assert "kappa n/a" in result.output and "-0.000" not in result.output
    assert "-0.000" not in (out / "report.md").read_text()

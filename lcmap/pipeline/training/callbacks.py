"""Lightning callbacks and the checkpoint writer of ``lcmap train``.

- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file beside them, then renamed;
  read back (``--resume``) with weights-only loading (:func:`lcmap.pipeline.runs.load_checkpoint_file`).
- :class:`SaveOnInterrupt`: Ctrl-C or SIGTERM saves ``last.ckpt`` (resumable with ``--resume``).
- :class:`SigtermOnAllRanks`: under DDP, SIGTERM on any rank stops all ranks at the same batch.
- :class:`PatchThroughput`: logs ``patches_per_s`` (training patches per second, all devices).
- :class:`EpochSummary`: one readable log line per epoch; redraws ``loss.png``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lcmap.pipeline.runs import load_checkpoint_file
from lcmap.pipeline.training.run_metrics import epoch_history, flatten_metrics, plot_history

log = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointIO", "EpochSummary", "PatchThroughput", "SaveOnInterrupt", "SigtermOnAllRanks"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it.

    (Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp folder, so the final move is a copy when that is another file system.)

    Reading (``trainer.fit(ckpt_path=...)``, i.e. ``--resume``) is weights-only whatever Lightning
    asks for: a checkpoint holding pickled code is refused (:class:`~lcmap.errors.UnsafeCheckpointError`).
    """

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class SaveOnInterrupt(Callback):
    """On Ctrl-C or SIGTERM, save the current state to ``last.ckpt`` (resumable with ``--resume``).

    Lightning turns SIGTERM into :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`
    at the next batch boundary (its signal connector); Ctrl-C is a KeyboardInterrupt. Either way
    ``saved_step`` is the ``global_step`` written to ``last.ckpt`` (None: nothing saved).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_step: int | None = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.global_step == 0:
            return
        what = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        try:
            if trainer.world_size > 1:
                # DDP: rank 0 writes, without trainer.save_checkpoint's barrier (the other ranks may be
                # stopped already, or waiting elsewhere); the others have nothing to write.
                if not trainer.is_global_zero:
                    return
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.save_checkpoint(checkpoint, str(self.path))
            else:
                trainer.save_checkpoint(str(self.path), weights_only=False)  # the full state, to resume from
            self.saved_step = int(trainer.global_step)
            log.info("%s: saved %s at step %d", what, self.path, trainer.global_step)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not save %s (%s); the previous last.ckpt is kept", what, self.path, exc)


class SigtermOnAllRanks(Callback):
    """DDP: SIGTERM on any rank stops every rank before the same training batch (then
    :class:`SaveOnInterrupt` saves ``last.ckpt`` on rank 0).

    Lightning 2.6's own handler runs a collective broadcast inside the signal handler and signals the
    other ranks again, which deadlocks when the scheduler signals every rank (as Slurm and Kubernetes
    do). Here the handler only notes the signal; at the start of each training batch the ranks
    all-reduce the note, and if any rank has it, all raise ``SIGTERMException`` there, together.
    With one process Lightning's handling is kept (see :mod:`lcmap.pipeline.training.signals`).
    """

    def __init__(self) -> None:
        self.received = False

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)  # Lightning restores the previous handler at teardown

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.world_size <= 1:
            return
        note = torch.tensor([1.0 if self.received else 0.0], device=pl_module.device)
        if float(trainer.strategy.reduce(note, reduce_op="max")) > 0:
            log.info("SIGTERM: stopping all %d processes", trainer.world_size)
            raise SIGTERMException


class PatchThroughput(Callback):
    """Logs ``patches_per_s``: training patches per second over all devices, an exponential moving
    average of the time between consecutive training batches (validation and loader start-up left out).
    """

    def __init__(self) -> None:
        self._last_batch_time: float | None = None
        self._rate_ema: float | None = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_batch_time = None  # do not count validation / dataloader start-up as step time

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_time is not None:
            bs = int(batch["image"].shape[0])
            rate = bs * trainer.world_size / max(now - self._last_batch_time, 1e-6)
            self._rate_ema = rate if self._rate_ema is None else 0.8 * self._rate_ema + 0.2 * rate
            pl_module.log(
                "patches_per_s",
                self._rate_ema,
                on_step=True,
                on_epoch=True,
                prog_bar=True,
                batch_size=bs,
                sync_dist=trainer.world_size > 1,
            )
        self._last_batch_time = now


class EpochSummary(Callback):
    """One readable log line per epoch, and loss.png redrawn after every epoch (rank 0)."""

    KEYS = ("loss", "loss_ce", "loss_mce", "plat_kept", "patches_per_s")

    def __init__(self, run_dir: Path, epochs: int) -> None:
        self.run_dir = run_dir
        self.epochs = epochs
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = time.perf_counter()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and (self.run_dir / "metrics.csv").is_file():
            try:
                self.history = epoch_history(flatten_metrics(self.run_dir, write=False))
            except Exception:  # noqa: BLE001
                self.history = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._sums, self._n, self._t0 = {}, 0, time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        self._n += 1
        for key in self.KEYS:
            value = metrics.get(f"{key}_step")
            if value is not None:
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
                self._sums[f"n_{key}"] = self._sums.get(f"n_{key}", 0.0) + 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        for key in self.KEYS:
            if self._sums.get(f"n_{key}"):
                row[key] = self._sums[key] / self._sums[f"n_{key}"]
        for key in ("val_miou", "val_oa"):
            if key in trainer.callback_metrics:
                row[key] = float(trainer.callback_metrics[key])
        row["seconds"] = time.perf_counter() - self._t0
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]
        best = max((h["val_miou"] for h in self.history if h.get("val_miou") is not None), default=None)
        parts = [f"epoch {row['epoch'] + 1}/{self.epochs}", f"step {row['step']}"]
        if "loss" in row:
            shown = [k for k in ("loss_ce", "loss_mce", "plat_kept") if k in row]
            detail = ", ".join(f"{k.replace('loss_', '')} {row[k]:.3f}" for k in shown)
            parts.append(f"loss {row['loss']:.3f}" + (f" ({detail})" if detail else ""))
        if "val_miou" in row:
            parts.append(f"val_miou {row['val_miou']:.3f} (best {best:.3f})")
        if "patches_per_s" in row:
            parts.append(f"{row['patches_per_s']:.1f} patches/s")
        parts.append(f"{row['seconds']:.0f} s")
        log.info("  ".join(parts))
        try:
            plot_history(self.history, self.run_dir / "loss.png")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not draw loss.png: %s", exc)

"""Training-run folders and self-contained checkpoints.

This module is the one owner of the RUN_DIR layout (:class:`RunFolder` writes and reads its files)::

    RUN_DIR/
      config.yaml              the options used (flags and config file merged; absolute paths)
      legend.yaml              the LR legend the network predicts (its class order = output channels)
      normalization.json       per-band mean and std of the imagery (digital numbers)
      class_weights.json       CE class weights (and the label frequencies they come from)
      composition.json         prior losses only: each LR class's composition used, the loss, the blur
      checkpoints/last.ckpt    Lightning checkpoint, written every epoch and on Ctrl-C or SIGTERM
      checkpoints/best.ckpt    best validation mIoU (vs the reference, else vs the LR labels);
                               ``lcmap predict --model RUN_DIR`` uses it only when validated
                               against a reference, else last.ckpt (:func:`resolve_checkpoint`)
      metrics.csv              every logged metric (logs/version_*/metrics.csv merged)
      loss.png                 loss curves and validation mIoU per epoch
      train.log                a readable log of the run
      logs/                    Lightning's CSV (and TensorBoard, when installed) logs

Every checkpoint is self-contained: its ``hyper_parameters`` carry the model name, the band count,
the legend and the normalisation, and its ``state_dict`` keys start with ``model.``. So
``lcmap predict --model`` needs RUN_DIR or one ``.ckpt`` file and nothing else.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmap.errors import LcmapInputError, UnsafeCheckpointError
from lcmap.geodata.legends import Legend
from lcmap.pipeline.training.config import TrainConfig
from lcmap.pipeline.training.run_metrics import epoch_history, flatten_metrics, plot_history

log = logging.getLogger("lcmap.train")

__all__ = [
    "CHECKPOINT_SAFE_GLOBALS",
    "REQUIRED_HPARAMS",
    "RunFolder",
    "TrainedModel",
    "atomic_write_text",
    "epoch_history",
    "flatten_metrics",
    "load_checkpoint_file",
    "load_trained_model",
    "plot_history",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "training_imagery_range",
]

#: Keys every checkpoint's ``hyper_parameters`` must hold.
REQUIRED_HPARAMS = ("model_name", "in_channels", "legend", "norm_mean", "norm_std")


@dataclass
class TrainedModel:
    """A network ready for inference, with what is needed to feed it and read its output.

    Attributes:
        model: the network in eval mode, on ``device``.
        model_name: ``paraformer``, ``paraformer-tiny`` or ``unet``.
        legend: the LR legend; output channel ``k`` is ``legend.classes[k]``.
        mean, std: per-band normalisation, shape ``(in_channels,)``, in the imagery's units.
        in_channels: number of image bands the network expects.
        checkpoint: the file it was loaded from.
        hparams: every hyper-parameter stored in the checkpoint.
    """

    model: nn.Module
    model_name: str
    legend: Legend
    mean: np.ndarray
    std: np.ndarray
    in_channels: int
    checkpoint: Path
    hparams: dict[str, Any]


def resolve_checkpoint(path: str | Path) -> Path:
    """RUN_DIR -> the checkpoint to map with; a ``.ckpt`` file -> itself.

    A run validated against an HR reference (``reference`` in RUN_DIR/config.yaml) gives its
    ``best.ckpt``. A run validated only against its LR labels gives ``last.ckpt``: agreement with
    the LR labels rewards copying them (30 m blocks), not mapping at 1 m, so it must not pick the
    model. Either falls back on the other when missing.
    """
    path = Path(path)
    if path.is_dir():
        order = ("best.ckpt", "last.ckpt") if _validated_on_reference(path) else ("last.ckpt", "best.ckpt")
        for name in order:
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise LcmapInputError(
            f"{path} holds no checkpoints/best.ckpt or checkpoints/last.ckpt: "
            "pass the RUN_DIR written by 'lcmap train' or a .ckpt file"
        )
    if not path.is_file():
        raise LcmapInputError(f"model {path} does not exist: pass a RUN_DIR or a .ckpt file")
    return path


def _validated_on_reference(run_dir: Path) -> bool:
    """Whether RUN_DIR/config.yaml names an HR reference (absent config: False).

    Raises:
        LcmapInputError: config.yaml exists but cannot be read (not UTF-8, bad YAML, unknown options):
            guessing would pick the checkpoint silently.
    """
    run = RunFolder(run_dir)
    if not run.config_yaml.exists():
        return False
    try:
        return bool(run.read_config().reference)
    except LcmapInputError as exc:
        raise LcmapInputError(
            f"{exc} (it says which checkpoint of {run_dir} to map with: fix it, or pass a .ckpt file to --model)"
        ) from exc


#: Python types a checkpoint may hold besides those ``torch.load(weights_only=True)`` always accepts
#: (tensors, storages, ``OrderedDict``, str/int/float/bool/None, list/tuple/dict/set). A checkpoint
#: written by ``lcmap train`` (Lightning 2.6: weights, optimizer and callback states, loops,
#: hyper-parameters as plain dicts and lists) holds none other: this list is empty on purpose, and
#: ``tests/test_reliability_training.py`` checks that a fresh checkpoint needs nothing more.
CHECKPOINT_SAFE_GLOBALS: list[Any] = []


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain values only, no code run.

    The one checkpoint reader of lcmap (``--model``, ``--resume`` through Lightning, Dask workers).

    Raises:
        UnsafeCheckpointError: the file holds Python objects beyond :data:`CHECKPOINT_SAFE_GLOBALS`
            (loading them could run arbitrary code); the message names the file and those objects.
        LcmapInputError: the file is missing, truncated or not a torch file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle file
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises turning weights_only off: never quoted
        unsafe = _unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} is not a plain checkpoint: it holds Python objects ({', '.join(unsafe[:5])}) that "
                "loading would run as code. lcmap loads only weights and plain values; refused. Use a "
                "checkpoint written by 'lcmap train' that you trust."
            ) from None
        raise _unreadable(path, exc) from exc
    except FileNotFoundError as exc:
        raise LcmapInputError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # torch raises many kinds for truncated/garbage files
        raise _unreadable(path, exc) from exc


def _unsafe_globals(path: Path) -> list[str]:
    """The globals (``module.name``) of a torch zip file outside the weights-only allowlist; [] if unreadable."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: reported as unreadable
        return []


def _unreadable(path: Path, exc: BaseException) -> LcmapInputError:
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):  # torch's text: "load it unsafely"
        return LcmapInputError(
            f"{path} is not a readable checkpoint: not an lcmap checkpoint, or truncated or corrupt; it cannot be "
            "loaded safely as weights. Use another checkpoint from the run folder or train again."
        )
    return LcmapInputError(
        f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}). "
        "It may be truncated: use another checkpoint from the run folder or train again."
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU (weights only), with a clear error when it is missing, corrupt or unsafe."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = load_checkpoint_file(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise LcmapInputError(f"{ckpt_path} is not an lcmap/Lightning checkpoint (no state_dict)")
    hp = ckpt.get("hyper_parameters", {})
    missing = [k for k in REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise LcmapInputError(f"{ckpt_path} lacks hyper-parameters {missing}: not written by lcmap train")
    return ckpt


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load RUN_DIR or a ``.ckpt`` into a :class:`TrainedModel` (eval mode) on ``device``."""
    from lcmap.models import build_model_with_weights, non_finite_tensors

    ckpt_path = resolve_checkpoint(path)
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    legend = Legend.from_dict(hp["legend"], source=str(ckpt_path))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    bad = non_finite_tensors(state) + [n for n in ("norm_mean", "norm_std") if not np.all(np.isfinite(hp[n]))]
    if bad or not np.all(np.asarray(hp["norm_std"]) > 0):  # a model that diverged maps every pixel as one class
        raise LcmapInputError(
            f"checkpoint {ckpt_path} holds NaN or infinite values ({', '.join(bad[:3]) or 'norm_std <= 0'}): "
            "refused, it would map every pixel as one class. Use an earlier checkpoint or train again (lower --lr)."
        )
    try:
        model = build_model_with_weights(hp["model_name"], int(hp["in_channels"]), len(legend), state)
    except RuntimeError as exc:
        raise LcmapInputError(f"{ckpt_path}: weights do not fit model {hp['model_name']!r}: {exc}") from exc
    model.eval().to(device)
    return TrainedModel(
        model=model,
        model_name=hp["model_name"],
        legend=legend,
        mean=np.asarray(hp["norm_mean"], dtype=np.float32),
        std=np.asarray(hp["norm_std"], dtype=np.float32),
        in_channels=int(hp["in_channels"]),
        checkpoint=ckpt_path,
        hparams=dict(hp),
    )


def training_imagery_range(tm: TrainedModel) -> dict[str, Any] | None:
    """The training imagery's data type and value range (``{"dtype", "low", "high"}``): from the
    checkpoint's ``imagery_range`` hyper-parameter, else from ``normalization.json`` of the run
    folder holding the checkpoint; None for runs of older lcmap versions."""
    record = tm.hparams.get("imagery_range")
    if record:
        return dict(record)
    run = RunFolder(tm.checkpoint.parent.parent)
    try:
        stats = run.read_normalization()
    except (OSError, ValueError, KeyError):
        return None
    return stats.range_record() if stats is not None else None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    legend: Legend,
    norm_mean: list[float] | np.ndarray,
    norm_std: list[float] | np.ndarray,
    **extra_hparams: Any,
) -> Path:
    """Write a self-contained checkpoint in the same format as ``lcmap train`` (atomically).

    Used by tests and tools that build a model outside Lightning.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_channels = len(norm_mean)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "model_name": model_name,
            "in_channels": in_channels,
            "legend": legend.to_dict(),
            "norm_mean": [float(v) for v in norm_mean],
            "norm_std": [float(v) for v in norm_std],
            **extra_hparams,
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------- run folder
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_with(path: Path, write: Any) -> None:
    """``write(temporary path)`` beside ``path``, then rename it onto ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunFolder:
    """The files of one RUN_DIR (layout in the module docs): where each lives, how it is written and read.

    Args:
        path: the RUN_DIR (need not exist yet).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_yaml = self.path / "config.yaml"
        self.legend_yaml = self.path / "legend.yaml"
        self.normalization_json = self.path / "normalization.json"
        self.class_weights_json = self.path / "class_weights.json"
        self.composition_json = self.path / "composition.json"
        self.checkpoints = self.path / "checkpoints"
        self.last_ckpt = self.checkpoints / "last.ckpt"
        self.best_ckpt = self.checkpoints / "best.ckpt"
        self.metrics_csv = self.path / "metrics.csv"
        self.loss_png = self.path / "loss.png"
        self.train_log = self.path / "train.log"
        self.logs = self.path / "logs"

    # ------------------------------------------------------------------------ the folder
    def create(self) -> Path | None:
        """Create RUN_DIR; return the topmost folder this created (None: RUN_DIR existed).

        Raises:
            LcmapInputError: RUN_DIR cannot be created or written (read-only file system, permissions).
        """
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            raise LcmapInputError(
                f"cannot create or write the run folder {self.path} ({exc.strerror or exc}): choose another --out"
            ) from exc
        return missing[-1] if missing else None

    def remove_created(self, created: Path | None) -> None:
        """After a failed or interrupted run: remove ``created`` (what :meth:`create` made) unless it holds a
        checkpoint. A folder that existed before the run (``created`` None) is never touched."""
        if created is not None and not self.last_ckpt.exists() and not self.best_ckpt.exists():
            shutil.rmtree(created, ignore_errors=True)

    def saved_step(self) -> int | None:
        """The ``global_step`` held by ``last.ckpt`` (None: no readable last.ckpt)."""
        if not self.last_ckpt.is_file():
            return None
        try:
            step = load_checkpoint_file(self.last_ckpt).get("global_step")
        except LcmapInputError:
            return None
        return int(step) if step is not None else None

    # ------------------------------------------------------------------------ options
    def write_config(self, config: TrainConfig) -> None:
        """Save the options (``resume`` saved as False: the file describes the run, not the call)."""
        import dataclasses

        dataclasses.replace(config, resume=False).to_yaml(self.config_yaml)

    def read_config(self) -> TrainConfig:
        """The saved options; LcmapInputError when missing or invalid.

        A config.yaml without ``default_mixed`` was written before legends declared mixed classes:
        its ``mixed_classes`` are all the run used, so it reads with ``default_mixed`` False.
        """
        import dataclasses

        import yaml

        if not self.config_yaml.is_file():
            raise LcmapInputError(f"{self.config_yaml} is missing; {self.path} is not a run folder of 'lcmap train'")
        config = TrainConfig.from_yaml(self.config_yaml)
        saved_keys = set(yaml.safe_load(self.config_yaml.read_text()) or {})
        if not saved_keys & {"default_mixed", "default-mixed"}:
            config = dataclasses.replace(config, default_mixed=False)
        return config

    # -------------------------------------------------------- legend, normalisation, weights
    def write_legend(self, legend: Legend) -> None:
        _replace_with(self.legend_yaml, legend.to_yaml)

    def write_normalization(self, stats: Any) -> None:
        """Save a :class:`~lcmap.geodata.normalization.BandStats` (per-band mean/std, imagery units)."""
        _replace_with(self.normalization_json, stats.to_json)  # other DDP ranks may be reading it (--resume)

    def read_normalization(self) -> Any:
        """The saved :class:`~lcmap.geodata.normalization.BandStats`, or None when absent."""
        from lcmap.geodata.normalization import BandStats

        return BandStats.from_json(self.normalization_json) if self.normalization_json.is_file() else None

    def write_class_weights(self, record: dict[str, Any]) -> None:
        """Save the class-weight record (:func:`lcmap.pipeline.training.class_weights.class_weights_record`)."""
        atomic_write_text(self.class_weights_json, json.dumps(record, indent=1))

    def write_composition(self, record: dict[str, Any]) -> None:
        """Save the compositions a prior loss trains on (:class:`lcmap.pipeline.training.label_prior.PriorTraining`)."""
        atomic_write_text(self.composition_json, json.dumps(record, indent=1))

    def read_class_weights(self) -> dict[str, Any] | None:
        """The saved class-weight record, or None when absent or unreadable."""
        try:
            return json.loads(self.class_weights_json.read_text())
        except (OSError, ValueError):
            return None

    # --------------------------------------------------------------- metrics and plot
    def write_metrics_and_plot(self) -> None:
        """``metrics.csv`` (merged logs) and ``loss.png``; a failure is logged, never raised."""
        try:
            rows = flatten_metrics(self.path)
            plot_history(epoch_history(rows), self.loss_png)
        except Exception as exc:  # noqa: BLE001 - never lose a run over a plot
            log.warning("could not write metrics.csv/loss.png: %s", exc)

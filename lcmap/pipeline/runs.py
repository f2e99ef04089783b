"""Training-run folders and self-contained checkpoints.

A RUN_DIR written by ``lcmap train`` holds::

    RUN_DIR/
      config.yaml            the training options (flags and config file merged)
      legend.yaml            the LR legend the network predicts (its class order = output channels)
      normalization.json     per-band mean and std of the imagery (digital numbers)
      checkpoints/last.ckpt  Lightning checkpoint, written every epoch and on Ctrl-C
      checkpoints/best.ckpt  the best one by the validation score
      metrics.csv, loss.png  metrics per epoch and the loss curves

Every checkpoint is self-contained: its ``hyper_parameters`` carry the model name, the band count,
the legend and the normalisation, and its ``state_dict`` keys start with ``model.``. So
``lcmap predict --model`` needs RUN_DIR or one ``.ckpt`` file and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import Legend

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
    """Whether RUN_DIR/config.yaml names an HR reference (unreadable or absent config: False)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and bool(config.get("reference"))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error when it is missing or corrupt."""
    ckpt_path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for truncated/garbage files
        raise LcmapInputError(
            f"{ckpt_path} is not a readable checkpoint ({type(exc).__name__}: {exc}). "
            "It may be truncated: use another checkpoint from the run folder or train again."
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise LcmapInputError(f"{ckpt_path} is not an lcmap/Lightning checkpoint (no state_dict)")
    hp = ckpt.get("hyper_parameters", {})
    missing = [k for k in REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise LcmapInputError(f"{ckpt_path} lacks hyper-parameters {missing}: not written by lcmap train")
    return ckpt


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load RUN_DIR or a ``.ckpt`` into a :class:`TrainedModel` (eval mode) on ``device``."""
    from lcmap.models import build_model

    ckpt_path = resolve_checkpoint(path)
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    legend = Legend.from_dict(hp["legend"], source=str(ckpt_path))
    model = build_model(hp["model_name"], int(hp["in_channels"]), len(legend))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
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

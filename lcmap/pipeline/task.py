"""The Lightning module that trains a network on LR labels: PLAT for Paraformer, plain CE for U-Net.

PLAT (pseudo-label-assisted training, Paraformer, CVPR 2024) for a two-head network::

    loss = CE_w(head1, y) + CE_w(head2, plat_mask(head1, y))

where ``y`` is the LR label on the 1 m grid (legend indices, IGNORE_INDEX for nodata / outside the
AOI), ``CE_w`` is cross-entropy weighted per class (``~1/sqrt(frequency)``, see
:func:`inverse_sqrt_frequency_weights`), and :func:`plat_mask` keeps ``y`` only where head 1's
argmax agrees with it (recomputed every step, no gradient). A one-head network (the U-Net
baseline) gets ``CE_w(logits, y)``.

The network predicts the LR legend's classes; validation takes the target class of highest summed
LR-class probability (as ``lcmap predict``) and scores it against the validation mask (the HR reference, or
the LR labels themselves when no reference is given), both in target classes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lcmap.geodata.legends import IGNORE_INDEX, Legend
from lcmap.models import build_model, predict_proba, sum_probabilities
from lcmap.pipeline.metrics import scores_from_confusion
from lcmap.pipeline.train import epoch_history, flatten_metrics, plot_history

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "EpochSummary",
    "LandCoverTask",
    "SaveOnInterrupt",
    "inverse_sqrt_frequency_weights",
    "plat_loss",
    "plat_mask",
    "weighted_ce",
]

#: Frequencies are floored at this value before ``1/sqrt``: a class seen on a handful of pixels
#: gets at most ~30x the weight of a class covering the whole area.
MIN_FREQUENCY = 1e-3


# ------------------------------------------------------------------------------------ losses
def plat_mask(head1_logits: Tensor, target: Tensor, allowed: Tensor | None = None) -> Tensor:
    """PLAT's mask label: ``target`` where head 1's argmax equals it, IGNORE_INDEX elsewhere.

    Args:
        head1_logits: ``(B, K, H, W)`` logits of head 1 (the CNN head).
        target: ``(B, H, W)`` int64 LR labels (legend indices, IGNORE_INDEX = ignored).
        allowed: optional ``(K, K)`` bool, ``allowed[y, k]``: class ``k`` is an acceptable answer
            for label ``y`` (identity when None; see :func:`weighted_ce`). Head 1 "agrees" where
            its argmax is acceptable for the label.

    Returns:
        ``(B, H, W)`` int64, no gradient. Ignored target pixels stay ignored.
    """
    with torch.no_grad():
        arg = head1_logits.argmax(dim=1)
        if allowed is None:
            agree = arg == target
        else:
            valid = target != IGNORE_INDEX
            agree = valid & allowed[torch.where(valid, target, torch.zeros_like(target)), arg]
        return torch.where(agree, target, torch.full_like(target, IGNORE_INDEX))


def weighted_ce(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                allowed: Tensor | None = None) -> Tensor:
    """Class-weighted mean cross-entropy over non-ignored pixels; 0 (with a graph) if there is none.

    ``sum_i w[y_i] * ce_i / sum_i w[y_i]`` as in :func:`torch.nn.functional.cross_entropy`, but a
    batch without any (weighted) valid pixel gives 0 instead of NaN.

    With ``allowed`` (``(K, K)`` bool; row ``y`` = the classes acceptable for label ``y``), the
    per-pixel term is the partial-label cross-entropy ``-log sum_{k in allowed[y]} p_k``: a label
    of a *mixed* LR class (e.g. NLCD 21, lawn with some pavement) asks for "one of these classes"
    and lets the image decide which. A row with only ``y`` itself is the plain cross-entropy.
    Every row must hold at least one class (checked where ``allowed`` is built).
    """
    logits = logits.float()
    valid = target != IGNORE_INDEX
    if allowed is None:
        total = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        safe = torch.where(valid, target, torch.zeros_like(target))
        ok = allowed[safe].permute(0, 3, 1, 2)  # (B, K, H, W)
        log_z = torch.logsumexp(logits, dim=1)
        log_ok = torch.logsumexp(logits.masked_fill(~ok, float("-inf")), dim=1)
        nll = torch.where(valid, log_z - log_ok, torch.zeros_like(log_z))
        if weight is not None:
            nll = nll * weight.to(nll.dtype)[safe]
        total = nll.sum()
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        denom = weight.to(total.dtype)[target[valid]].sum()
    # No valid (or only zero-weight) pixels: total is exactly 0, and so is the result.
    return total / denom.clamp_min(1e-12)


def plat_loss(
    head1: Tensor, head2: Tensor, target: Tensor, weights: Tensor | None = None, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PLAT loss for a two-head network.

    Args:
        head1: ``(B, K, H, W)`` logits of head 1 (CNN head), trained on the LR label.
        head2: ``(B, K, H, W)`` logits of head 2 (Transformer head), trained on the mask label.
        target: ``(B, H, W)`` int64 LR labels, IGNORE_INDEX where ignored.
        weights: optional ``(K,)`` class weights.
        allowed: optional ``(K, K)`` acceptable classes per label (mixed LR classes; see
            :func:`weighted_ce`).

    Returns:
        ``(total, ce, mce, kept)``: ``ce + mce``, the head-1 CE, the head-2 masked CE, and the
        fraction of valid label pixels the mask keeps (no gradient).
    """
    mask = plat_mask(head1, target, allowed)
    ce = weighted_ce(head1, target, weights, allowed)
    mce = weighted_ce(head2, mask, weights, allowed)
    valid = (target != IGNORE_INDEX).sum()
    kept = (mask != IGNORE_INDEX).sum().float() / valid.clamp_min(1).float()
    return ce + mce, ce, mce, kept.detach()


# ------------------------------------------------------------------------------ class weights
def inverse_sqrt_frequency_weights(
    counts: Sequence[int] | np.ndarray,
    occurs: Sequence[bool] | np.ndarray | None = None,
    min_frequency: float = MIN_FREQUENCY,
    power: float = 0.5,
) -> np.ndarray:
    """Class weights ``~ 1/sqrt(frequency)``, normalised to mean 1 over the classes present.

    Args:
        counts: pixels per class (legend index order), counted on sampled training patches.
        occurs: per class, whether the class occurs anywhere in the label files (from the scan
            done before training). A class missed by the sampled patches but occurring in the files
            gets the largest weight of the present classes; a class that never occurs gets 0 (it is
            never a target, so its weight has no effect). None: ``counts > 0``.
        min_frequency: frequencies are floored at this value before the square root.
        power: the exponent: 0.5 for ``1/sqrt(frequency)``, 1 for ``1/frequency``.

    Returns:
        float64 ``(K,)`` weights.

    Raises:
        ValueError: if no class has any pixel.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled pixel to compute class weights from")
    occurs_arr = present if occurs is None else (np.asarray(occurs, dtype=bool) | present)
    freq = counts / counts.sum()
    weights = np.zeros_like(counts)
    weights[present] = np.maximum(freq[present], min_frequency) ** -power
    weights[present] /= weights[present].mean()
    weights[occurs_arr & ~present] = weights[present].max()
    return weights


# ----------------------------------------------------------------------------------- module
class LandCoverTask(pl.LightningModule):
    """Trains ``build_model(model_name, ...)`` on LR labels (PLAT for two heads, CE for one).

    Batches are ``{"image": (B, C, H, W) normalised float, "mask": (B, H, W) int64}`` (the datamodule
    normalises and augments in ``on_after_batch_transfer``). The network is ``self.model``; the
    hyper-parameters saved in every checkpoint include the keys :func:`lcmap.pipeline.runs.
    load_trained_model` needs (``model_name``, ``in_channels``, ``legend``, ``norm_mean``,
    ``norm_std``).

    Args:
        model_name: ``paraformer``, ``paraformer-tiny`` or ``unet``.
        in_channels: image bands.
        legend: the LR legend as ``Legend.to_dict()`` (output channel k = class k).
        norm_mean, norm_std: per-band normalisation (imagery units), stored for inference.
        class_weights: ``(K,)`` CE class weights, or None for unweighted CE.
        lr: peak learning rate.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, as in the paper).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_fraction: fraction of the steps with a linear warm-up (AdamW only).
        vit_weights: optional local file of pretrained ViT weights (Paraformer only).
        val_legend: legend of the validation masks as a dict (the reference's), or None when the
            validation masks are the LR labels themselves.
        val_source: ``reference`` or ``labels``, for messages.
        config: the training options (stored for the record).
        allowed_classes: per class index, the class indices acceptable for its label (mixed LR
            classes, partial-label CE; see :func:`weighted_ce`), or None (plain CE).
    """

    def __init__(
        self,
        model_name: str,
        in_channels: int,
        legend: dict[str, Any],
        norm_mean: Sequence[float],
        norm_std: Sequence[float],
        class_weights: Sequence[float] | None = None,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05,
        vit_weights: str | None = None,
        val_legend: dict[str, Any] | None = None,
        val_source: str = "labels",
        config: dict[str, Any] | None = None,
        allowed_classes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.legend = Legend.from_dict(legend)
        self.model = build_model(model_name, in_channels, len(self.legend), vit_weights=vit_weights)
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        if weights is not None and weights.numel() != len(self.legend):
            raise ValueError(f"{weights.numel()} class weights for {len(self.legend)} classes")
        self.register_buffer("class_weights", weights, persistent=False)
        allowed = None
        if allowed_classes is not None:
            k = len(self.legend)
            if len(allowed_classes) != k:
                raise ValueError(f"{len(allowed_classes)} rows of allowed classes for {k} classes")
            allowed = torch.zeros((k, k), dtype=torch.bool)
            for y, row in enumerate(allowed_classes):
                if not row:
                    raise ValueError(f"class {y}: no acceptable class for its label")
                allowed[y, list(row)] = True
        self.register_buffer("allowed", allowed, persistent=False)
        # LR legend index -> target index, len(target) where untargeted (summed probabilities).
        self.register_buffer("target_group", torch.from_numpy(self.legend.index_to_target_group()), persistent=False)
        val = Legend.from_dict(val_legend) if val_legend is not None else self.legend
        self.register_buffer(
            "mask_to_target", torch.from_numpy(val.index_to_target_lut().astype(np.int64)),
            persistent=False,
        )
        self.target_names = list(self.legend.target.names)
        self._confusion: Tensor | None = None
        self._last_batch_time: float | None = None
        self._rate_ema: float | None = None

    # -------------------------------------------------------------------- forward / losses
    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model(x)

    def compute_loss(self, outputs: list[Tensor], target: Tensor) -> dict[str, Tensor]:
        """Losses for the network's outputs: PLAT for two heads, weighted CE for one."""
        if len(outputs) == 2:
            total, ce, mce, kept = plat_loss(outputs[0], outputs[1], target, self.class_weights, self.allowed)
            return {"loss": total, "loss_ce": ce, "loss_mce": mce, "plat_kept": kept}
        if len(outputs) != 1:
            raise ValueError(f"expected 1 or 2 heads, got {len(outputs)}")
        ce = weighted_ce(outputs[0], target, self.class_weights, self.allowed)
        return {"loss": ce, "loss_ce": ce}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["mask"]
        losses = self.compute_loss(self(image), target)
        bs = image.shape[0]
        sync = self.trainer.world_size > 1
        for name, value in losses.items():
            self.log(name, value, on_step=True, on_epoch=True, prog_bar=name in ("loss", "loss_ce", "loss_mce"),
                     batch_size=bs, sync_dist=sync)
        now = time.perf_counter()
        if self._last_batch_time is not None:
            rate = bs * self.trainer.world_size / max(now - self._last_batch_time, 1e-6)
            self._rate_ema = rate if self._rate_ema is None else 0.8 * self._rate_ema + 0.2 * rate
            self.log("patches_per_s", self._rate_ema, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs,
                     sync_dist=sync)
        self._last_batch_time = now
        return losses["loss"]

    def on_train_epoch_start(self) -> None:
        self._last_batch_time = None  # do not count validation / dataloader start-up as step time

    # ------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        n = len(self.target_names)
        self._confusion = torch.zeros(n * n, dtype=torch.int64, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        probs = predict_proba(self.model, batch["image"])
        # as lcmap predict: the target class of highest summed LR-class probability
        n = len(self.target_names)
        arg = sum_probabilities(probs, self.target_group, n + 1).argmax(dim=1)
        pred = torch.where(arg == n, torch.full_like(arg, IGNORE_INDEX), arg)
        truth = self.mask_to_target[batch["mask"]]
        keep = (pred != IGNORE_INDEX) & (truth != IGNORE_INDEX)
        n = len(self.target_names)
        assert self._confusion is not None
        self._confusion += torch.bincount(truth[keep] * n + pred[keep], minlength=n * n)

    def on_validation_epoch_end(self) -> None:
        assert self._confusion is not None
        cm = self.trainer.strategy.reduce(self._confusion.clone(), reduce_op="sum")
        n = len(self.target_names)
        scores = scores_from_confusion(cm.view(n, n).cpu().numpy(), self.target_names)
        self.last_val_scores = scores
        miou = scores["miou"] if scores["miou"] is not None else 0.0
        oa = scores["oa"] if scores["oa"] is not None else 0.0
        # Every rank holds the same (summed) confusion matrix: syncing averages identical values.
        self.log("val_miou", miou, prog_bar=True, sync_dist=True)
        self.log("val_oa", oa, sync_dist=True)
        for name, pc in scores["per_class"].items():
            if pc["iou"] is not None:
                self.log(f"val_iou_{name.replace(' ', '_')}", pc["iou"], sync_dist=True)

    # -------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {hp.optimizer!r}: adamw or sgd")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total) if hp.optimizer == "adamw" else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if hp.optimizer == "sgd":  # the paper's poly decay, power 0.9
                return max(0.0, 1.0 - progress) ** 0.9
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 1 %

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------ callbacks
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it.

    (Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp folder, so the final move is a copy when that is another file system.)
    """

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
    """On Ctrl-C, save the current state to ``last.ckpt`` (resumable with ``--resume``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.global_step == 0:
            return
        try:
            trainer.save_checkpoint(str(self.path))
            log.info("Ctrl-C: saved %s at step %d", self.path, trainer.global_step)
        except Exception as exc:  # noqa: BLE001
            log.warning("Ctrl-C: could not save %s (%s); the previous last.ckpt is kept", self.path, exc)


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
            detail = ", ".join(f"{k.replace('loss_', '')} {row[k]:.3f}" for k in ("loss_ce", "loss_mce", "plat_kept") if k in row)
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

"""The Lightning module that trains a network on LR labels: PLAT for Paraformer, plain CE for U-Net, or
a loss on the LR classes' compositions (``--label-loss``).

The losses are in :mod:`lcmap.pipeline.training.losses`, the class weights in
:mod:`lcmap.pipeline.training.class_weights`, the callbacks in :mod:`lcmap.pipeline.training.callbacks`.

The network predicts the LR legend's classes (``plat``, ``ce``), or the target classes (prior losses:
its legend is then the target legend, and the LR legend with its compositions is recorded as
``label_legend``); validation takes the target class of highest summed
LR-class probability (as ``lcmap predict``) and scores it against the validation mask (the HR reference, or
the LR labels themselves when no reference is given), both in target classes: a torchmetrics
``MulticlassConfusionMatrix`` summed over the devices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from lcmap.geodata.legends import IGNORE_INDEX, Legend
from lcmap.models import build_model, sum_probabilities
from lcmap.models.context import predict_proba_valid
from lcmap.models.tta import predict_proba_tta
from lcmap.pipeline.metrics import scores_from_confusion
from lcmap.pipeline.training.losses import PRIOR_LOSSES, PriorSpec, label_loss

log = logging.getLogger(__name__)

__all__ = ["LandCoverTask"]


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
        imagery_range: the training imagery's data type and value range
            (:meth:`~lcmap.geodata.normalization.BandStats.range_record`), stored so that
            ``lcmap predict`` can refuse imagery of another kind.
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
        allowed_classes: per label value, the class indices acceptable for it (mixed LR classes,
            partial-label CE; see :func:`weighted_ce`), or None (plain CE). Usually one row per
            class; fused label products (:mod:`lcmap.pipeline.training.label_products`) add rows for label
            values that are sets of classes (then ``class_weights`` has one weight per row).
        val_tta: test-time augmentation of the validation windows (:mod:`lcmap.models.tta`):
            ``none``, ``flips`` or ``d4``, as ``lcmap predict --tta``.
        label_loss: the loss (:data:`lcmap.pipeline.training.config.LABEL_LOSSES`).
        composition: prior losses: the composition table ``(K, T)`` (per LR label value, the mean
            fraction of each target class; :func:`lcmap.geodata.compositions.composition_table`).
        composition_sigma: its spreads ``(K, T)``.
        prior_blur_px: blur of the prior (pixels; 0: none).
        label_legend: prior losses: the LR legend (with its compositions) as a dict, for the record.
        label_frequency: ``(K,)`` frequency of each LR class in the sampled training patches, stored
            for ``lcmap predict --label-prior`` (:mod:`lcmap.pipeline.prediction.prediction_prior`); None with
            fused label products.
    """

    # buffers (registered in __init__; declared here for the type checker)
    class_weights: Tensor | None
    allowed: Tensor | None
    target_group: Tensor
    mask_to_target: Tensor

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
        imagery_range: dict[str, Any] | None = None,
        val_tta: str = "none",
        label_loss: str = "plat",
        composition: Sequence[Sequence[float]] | None = None,
        composition_sigma: Sequence[Sequence[float]] | None = None,
        prior_blur_px: float = 0.0,
        label_legend: dict[str, Any] | None = None,
        label_frequency: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.legend = Legend.from_dict(legend)
        self.model = build_model(model_name, in_channels, len(self.legend), vit_weights=vit_weights)
        k = len(self.legend)
        self.prior: PriorSpec | None = None
        if label_loss in PRIOR_LOSSES:
            if composition is None:
                raise ValueError(f"label loss {label_loss!r} needs a composition table")
            mean = torch.tensor(composition, dtype=torch.float32)
            sigma = torch.tensor(composition_sigma, dtype=torch.float32) if composition_sigma is not None else None
            if mean.ndim != 2 or mean.shape[1] != k or (sigma is not None and sigma.shape != mean.shape):
                raise ValueError(f"the composition table must be (label classes, {k} target classes)")
            self.prior = PriorSpec(mean, sigma if sigma is not None else torch.zeros_like(mean), float(prior_blur_px))
            allowed_classes = None  # the compositions replace the mixed classes
        # label values: the legend's classes, or more with fused label products (sets of classes) or
        # with a prior loss (the LR classes, the network predicting the target classes)
        n_labels = k if allowed_classes is None else len(allowed_classes)
        if self.prior is not None:
            n_labels = self.prior.mean.shape[0]
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        if weights is not None and weights.numel() != n_labels:
            raise ValueError(f"{weights.numel()} class weights for {n_labels} label classes")
        self.register_buffer("class_weights", weights, persistent=False)
        allowed = None
        if allowed_classes is not None:
            if n_labels < k:
                raise ValueError(f"{n_labels} rows of allowed classes for {k} classes")
            allowed = torch.zeros((n_labels, k), dtype=torch.bool)
            for y, row in enumerate(allowed_classes):
                if not row:
                    raise ValueError(f"class {y}: no acceptable class for its label")
                allowed[y, list(row)] = True
        self.register_buffer("allowed", allowed, persistent=False)
        # LR legend index -> target index, len(target) where untargeted (summed probabilities).
        self.register_buffer("target_group", torch.from_numpy(self.legend.index_to_target_group()), persistent=False)
        # the validation masks: the reference's codes, else the LR labels (in the LR legend: with a prior
        # loss, not the network's legend)
        val_dict = val_legend or label_legend
        val = Legend.from_dict(val_dict) if val_dict else self.legend
        self.register_buffer(
            "mask_to_target",
            torch.from_numpy(val.index_to_target_lut().astype(np.int64)),
            persistent=False,
        )
        self.target_names = list(self.legend.target.names)
        # (target truth, target prediction) counts over the validation windows, summed over devices
        self.val_confusion = MulticlassConfusionMatrix(len(self.target_names), validate_args=False)

    # -------------------------------------------------------------------- forward / losses
    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model(x)

    def compute_loss(self, outputs: list[Tensor], target: Tensor) -> dict[str, Tensor]:
        """Losses for the network's outputs (:func:`lcmap.pipeline.training.losses.label_loss`): by default PLAT
        for two heads, weighted CE for one."""
        kind = self.hparams.get("label_loss", "plat")
        return label_loss(kind, outputs, target, self.class_weights, self.allowed, self.prior)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["mask"]
        losses = self.compute_loss(self(image), target)
        bs = image.shape[0]
        sync = self.trainer.world_size > 1
        for name, value in losses.items():
            self.log(
                name,
                value,
                on_step=True,
                on_epoch=True,
                prog_bar=name in ("loss", "loss_ce", "loss_mce"),
                batch_size=bs,
                sync_dist=sync,
            )
        return losses["loss"]

    # ------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        tta = self.hparams.get("val_tta", "none")
        probs = predict_proba_tta(self.model, batch["image"], tta)
        valid = batch.get("valid")
        if valid is not None and not bool(valid.all()):
            # as lcmap predict: a window that is not all imagery is classified from its valid box only
            for k in torch.nonzero(~valid.view(len(valid), -1).all(dim=1)).flatten().tolist():
                v = valid[k].cpu().numpy()
                found = predict_proba_valid(self.model, batch["image"][k].cpu().numpy(), v, tta, device=probs.device)
                probs[k] = 0.0
                if found is not None:
                    p, (r0, r1, c0, c1) = found
                    probs[k, :, r0:r1, c0:c1] = p
        # as lcmap predict: the target class of highest summed LR-class probability
        n = len(self.target_names)
        arg = sum_probabilities(probs, self.target_group, n + 1).argmax(dim=1)
        pred = torch.where(arg == n, torch.full_like(arg, IGNORE_INDEX), arg)
        truth = self.mask_to_target[batch["mask"]]
        keep = (pred != IGNORE_INDEX) & (truth != IGNORE_INDEX)
        if valid is not None:
            keep &= valid  # no imagery, no score (lcmap predict maps it nodata)
        self.val_confusion.update(pred[keep], truth[keep])

    def on_validation_epoch_end(self) -> None:
        cm = self.val_confusion.compute()  # summed over the devices
        self.val_confusion.reset()
        n = len(self.target_names)
        scores = scores_from_confusion(cm.view(n, n).cpu().numpy().astype(np.int64), self.target_names)
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
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams  # Lightning's AttributeDict of the saved hyper-parameters
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
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

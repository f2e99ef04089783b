"""The per-pixel prior over target classes implied by the LR labels and their compositions.

For a pixel whose LR label is class ``k``, the prior is row ``k`` of the composition table
(:func:`lcmap.geodata.compositions.composition_table`): e.g. NLCD 21 -> 42 % tree canopy, 46 % low
vegetation, 11 % built-up. With a blur (``--prior-blur-m``, after Rolf et al., UAI 2022, who blur
the one-hot NLCD label with a Gaussian before multiplying it by the class co-occurrences), the
prior at a pixel is the Gaussian-weighted mean of its neighbours' rows::

    prior(i) = sum_j g(i - j) v_j M[y_j] / sum_j g(i - j) v_j

(``g`` a Gaussian of standard deviation ``blur_px`` truncated at 3 sigma, ``v_j`` 1 where pixel
``j`` has a label with a composition). Only the labels inside the training patch are seen: near
the patch edge the mean is over the neighbours inside it (the normalisation makes it a mean, so
it still sums to 1). Pixels without a usable label get no prior (``valid`` False).

:func:`prior_training` gathers what ``lcmap train`` needs to train on the prior: the network's
classes (the target classes), the table, and its record for RUN_DIR.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lcmap.geodata.legends import IGNORE_INDEX

log = logging.getLogger("lcmap.train")

__all__ = ["PriorTraining", "gaussian_blur", "gaussian_kernel", "label_prior", "prior_training"]


def gaussian_kernel(sigma_px: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-D Gaussian of standard deviation ``sigma_px`` pixels over ``-ceil(3 sigma) .. ceil(3 sigma)``,
    summing to 1."""
    radius = max(1, math.ceil(3.0 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return (g / g.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma_px: float) -> Tensor:
    """``(B, C, H, W)`` blurred by a separable Gaussian (:func:`gaussian_kernel`); outside the array
    counts as 0 (zero padding)."""
    g = gaussian_kernel(sigma_px, x.dtype).to(x.device)
    r, c = g.numel() // 2, x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def label_prior(labels: Tensor, mean: Tensor, blur_px: float = 0.0) -> tuple[Tensor, Tensor]:
    """The prior over target classes of each pixel (module docs).

    Args:
        labels: ``(B, H, W)`` int64 LR legend indices, IGNORE_INDEX where there is no label.
        mean: ``(K, T)`` composition table (rows sum to 1; a row of zeros: a class without one).
        blur_px: standard deviation of the Gaussian blur in pixels (0: none).

    Returns:
        ``(prior, valid)``: float ``(B, T, H, W)`` (0 where not valid; rows sum to 1 elsewhere) and
        bool ``(B, H, W)``: the pixel's label exists and its class has a composition.
    """
    mean = mean.to(device=labels.device, dtype=torch.float32)
    in_table = labels < mean.shape[0]
    safe = torch.where(in_table, labels, torch.zeros_like(labels))
    valid = (labels != IGNORE_INDEX) & in_table & (mean.sum(dim=1)[safe] > 0)
    prior = mean[safe].permute(0, 3, 1, 2) * valid.unsqueeze(1)
    if blur_px > 0:
        weight = gaussian_blur(valid.unsqueeze(1).float(), blur_px)
        prior = gaussian_blur(prior, blur_px) / weight.clamp_min(1e-12)
        prior = prior * valid.unsqueeze(1)
    return prior, valid


@dataclass
class PriorTraining:
    """How a run trains on the prior (``lcmap train --label-loss prior|prior-plat|lsr|qr``).

    Attributes:
        net_legend: the network's classes: the target legend of the LR legend's scheme.
        task_args: the :class:`~lcmap.pipeline.training.task.LandCoverTask` arguments (composition table,
            its spreads, blur in pixels, the LR legend with its compositions).
        record: what RUN_DIR/composition.json records (:meth:`CompositionTable.record`, the loss
            and the blur in metres and pixels).
    """

    net_legend: Any
    task_args: dict[str, Any]
    record: dict[str, Any]


def prior_training(label_loss: str, legend: Any, blur_m: float, res_m: float) -> PriorTraining | None:
    """The composition table of the LR ``legend`` (declared, else default: :func:`lcmap.geodata.
    compositions.composition_table`) for training with ``label_loss`` and a blur of ``blur_m``
    metres on a grid of ``res_m`` metre pixels; None unless ``label_loss`` is a prior loss."""
    from lcmap.geodata.compositions import composition_table
    from lcmap.geodata.legends import target_legend
    from lcmap.pipeline.training.config import PRIOR_LOSSES

    if label_loss not in PRIOR_LOSSES:
        return None
    log.info(
        "label loss %s: the network predicts the target classes, trained on the compositions of legend %s "
        "(blur %g m); mixed classes are not used", label_loss, legend.name, blur_m,
    )  # fmt: skip
    table = composition_table(legend)
    blur_px = float(blur_m) / float(res_m) if blur_m else 0.0
    task_args = {
        "label_loss": label_loss,
        "composition": table.mean.tolist(),
        "composition_sigma": table.sigma.tolist(),
        "prior_blur_px": blur_px,
        "label_legend": legend.to_dict(),
    }
    record = {"label_loss": label_loss, "prior_blur_m": float(blur_m), "prior_blur_px": blur_px, **table.record(legend)}
    return PriorTraining(target_legend(legend.target), task_args, record)

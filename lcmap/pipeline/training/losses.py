"""Training losses (``--label-loss``): PLAT (pseudo-label-assisted training, Paraformer, CVPR 2024),
class-weighted CE, and the losses that train on the LR classes' compositions (the *prior*).

PLAT for a two-head network::

    loss = CE_w(head1, y) + CE_w(head2, plat_mask(head1, y))

where ``y`` is the LR label on the 1 m grid (legend indices, IGNORE_INDEX for nodata / outside the
AOI), ``CE_w`` is cross-entropy weighted per class (see :mod:`lcmap.pipeline.training.class_weights`), and
:func:`plat_mask` keeps ``y`` only where head 1's argmax agrees with it (recomputed every step, no
gradient). A one-head network (the U-Net baseline) gets ``CE_w(logits, y)``. ``plat`` and ``ce``
train the network on the LR legend's classes (:func:`label_loss` names them all).

The prior losses train the network on the TARGET classes. The prior ``q`` of a pixel is the
composition of its LR class (optionally blurred over the neighbouring cells;
:func:`lcmap.pipeline.training.label_prior.label_prior`), e.g. NLCD 21 -> 42 % tree canopy, 46 % low
vegetation, 11 % built-up; ``p`` is a head's softmax; sums over pixels are weighted by the class
weight of the pixel's LR label:

- ``prior``: every head, the soft-target cross-entropy ``-sum_t q_t log p_t`` (:func:`soft_ce`;
  its minimum is at ``p = q``);
- ``prior-plat``: head 1 as ``prior``; head 2 the CE against head 1's posterior under the prior,
  ``argmax_t p1_t q_t`` (no gradient through it): PLAT's idea in target classes;
- ``lsr``: label super-resolution (Malkin et al., ICLR 2019), every head: per patch and LR class
  (the region of the patch holding that label), the predicted mean class mix vs the composition's
  mean +- sigma (:func:`lsr_loss`);
- ``qr``: the implicit-posterior loss of Rolf et al. (UAI 2022), every head (:func:`qr_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lcmap.geodata.legends import IGNORE_INDEX
from lcmap.pipeline.training.config import LABEL_LOSSES, PRIOR_LOSSES
from lcmap.pipeline.training.label_prior import label_prior

__all__ = [
    "LABEL_LOSSES",
    "PRIOR_LOSSES",
    "PriorSpec",
    "label_loss",
    "lsr_loss",
    "plat_loss",
    "plat_mask",
    "prior_plat_loss",
    "qr_loss",
    "soft_ce",
    "weighted_ce",
]


def plat_mask(head1_logits: Tensor, target: Tensor, allowed: Tensor | None = None) -> Tensor:
    """PLAT's mask label: ``target`` where head 1's argmax equals it, IGNORE_INDEX elsewhere.

    Args:
        head1_logits: ``(B, K, H, W)`` logits of head 1 (the CNN head).
        target: ``(B, H, W)`` int64 LR labels (legend indices, IGNORE_INDEX = ignored).
        allowed: optional ``(L, K)`` bool (``L >= K`` label values), ``allowed[y, k]``: class ``k`` is
            an acceptable answer for label ``y`` (identity when None; see :func:`weighted_ce`). Head 1 "agrees" where
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


def weighted_ce(logits: Tensor, target: Tensor, weight: Tensor | None = None, allowed: Tensor | None = None) -> Tensor:
    """Class-weighted mean cross-entropy over non-ignored pixels; 0 (with a graph) if there is none.

    ``sum_i w[y_i] * ce_i / sum_i w[y_i]`` as in :func:`torch.nn.functional.cross_entropy`, but a
    batch without any (weighted) valid pixel gives 0 instead of NaN.

    With ``allowed`` (``(L, K)`` bool, ``L >= K``; row ``y`` = the classes acceptable for label ``y``;
    ``weight`` then has ``L`` entries, one per label value), the
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


# ------------------------------------------------------------------------------ prior losses
@dataclass
class PriorSpec:
    """What the prior losses need: the composition table (``mean``, ``sigma``: ``(K, T)`` tensors,
    LR legend index x target index) and the blur of the prior in pixels (0: none)."""

    mean: Tensor
    sigma: Tensor
    blur_px: float = 0.0


def _pixel_weights(target: Tensor, valid: Tensor, weights: Tensor | None) -> Tensor:
    """float ``(B, H, W)``: the class weight of each pixel's LR label (1 without weights), 0 where not valid."""
    if weights is None:
        return valid.float()
    safe = torch.where(valid, target, torch.zeros_like(target))
    return weights.float().to(target.device)[safe] * valid


def soft_ce(logits: Tensor, prior: Tensor, pixel_weight: Tensor) -> Tensor:
    """``sum_i w_i (-sum_t q_it log p_it) / sum_i w_i``: cross-entropy against the soft target ``prior``.

    Args:
        logits: ``(B, T, H, W)``; ``p = softmax(logits)``.
        prior: ``(B, T, H, W)`` soft target ``q`` (rows sum to 1 where weighted).
        pixel_weight: ``(B, H, W)`` weights ``w_i`` (0: pixel left out). No weight at all gives 0.
    """
    ce = -(prior * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (ce * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


def prior_plat_loss(
    head1: Tensor, head2: Tensor, prior: Tensor, pixel_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Head 1: :func:`soft_ce` against the prior; head 2: CE against ``argmax_t p1_t q_t`` (head 1's
    posterior under the prior, no gradient), both weighted by ``pixel_weight``.

    Returns:
        ``(total, head-1 loss, head-2 loss, agree)``; ``agree``: the weighted fraction of pixels where
        the posterior's class is head 1's own argmax (the prior did not overrule it).
    """
    l1 = soft_ce(head1, prior, pixel_weight)
    with torch.no_grad():
        p1 = torch.softmax(head1.float(), dim=1)
        pseudo = (p1 * prior).argmax(dim=1)
        same = (pseudo == p1.argmax(dim=1)).float()
        agree = (same * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)
    nll = F.cross_entropy(head2.float(), pseudo, reduction="none")
    l2 = (nll * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)
    return l1 + l2, l1, l2, agree


#: The constant ``c`` of the log term of :func:`lsr_loss` (Malkin et al. use log(var + 0.03)).
LSR_LOG_EPS = 0.03


def lsr_loss(
    logits: Tensor, target: Tensor, valid: Tensor, mean: Tensor, sigma: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Label super-resolution loss (Malkin et al., ICLR 2019), one term per region: the pixels of one
    patch holding one LR class ``k``.

    Over a region of ``n`` pixels, ``m_t = mean p_t`` is the predicted class mix and
    ``v_t = sum p_t (1 - p_t) / n^2`` its variance; with the composition's mean ``mu_t`` and
    spread ``s_t`` of class ``k``::

        crit = sum_t  relu(|m_t - mu_t| - s_t)^2 / (v_t + s_t^2 + 1e-6)  +  log(1 + v_t / c)

    (``c`` = :data:`LSR_LOG_EPS`): zero when the mix lies within ``mu +- s`` and the pixels are
    certain. The loss is the mean of the regions' ``crit`` weighted by ``n`` times the class weight.

    Args:
        logits: ``(B, T, H, W)``.
        target: ``(B, H, W)`` int64 LR legend indices.
        valid: ``(B, H, W)`` bool: pixels taking part.
        mean, sigma: ``(K, T)`` composition table.
        weights: optional ``(K,)`` class weights.
    """
    b, t = logits.shape[:2]
    k = mean.shape[0]
    p = torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, t)
    keep = valid.reshape(-1)
    labels = torch.where(valid, target, torch.zeros_like(target)).reshape(-1)
    batch = torch.arange(b, device=logits.device).repeat_interleave(valid[0].numel())
    region = (batch * k + labels)[keep]
    p = p[keep]
    n = torch.zeros(b * k, device=p.device).index_add_(0, region, torch.ones_like(region, dtype=p.dtype))
    sums = torch.zeros(b * k, t, device=p.device).index_add_(0, region, p)
    var_sums = torch.zeros(b * k, t, device=p.device).index_add_(0, region, p * (1 - p))
    present = n > 0
    n, sums, var_sums = n[present], sums[present], var_sums[present]
    cls = torch.arange(b * k, device=p.device)[present] % k
    m = sums / n[:, None]
    v = var_sums / (n[:, None] ** 2)
    mu, s = mean.float().to(p.device)[cls], sigma.float().to(p.device)[cls]
    d = torch.relu((m - mu).abs() - s)
    crit = (d**2 / (v + s**2 + 1e-6) + torch.log1p(v / LSR_LOG_EPS)).sum(dim=1)
    w = n if weights is None else n * weights.float().to(p.device)[cls]
    if w.numel() == 0:
        return logits.sum() * 0.0
    return (crit * w).sum() / w.sum().clamp_min(1e-12)


#: Smallest prior probability in :func:`qr_loss` (the log of a zero fraction is -inf).
QR_PRIOR_FLOOR = 1e-4


def qr_loss(logits: Tensor, prior: Tensor, pixel_weight: Tensor) -> Tensor:
    """The implicit-posterior ("QR") loss of Rolf et al. (UAI 2022), forward form::

        sum_t qbar_t log qbar_t  -  sum_i w_i sum_t p_it log q_it / sum_i w_i

    with ``p`` the network's softmax, ``q`` the prior (floored at :data:`QR_PRIOR_FLOOR`) and
    ``qbar`` the weighted mean of ``p`` over the batch's pixels. For one pixel it is
    ``KL(p || q)``, 0 at ``p = q``.
    """
    p = torch.softmax(logits.float(), dim=1)
    total = pixel_weight.sum().clamp_min(1e-12)
    w = pixel_weight.unsqueeze(1)
    qbar = (p * w).sum(dim=(0, 2, 3)) / total
    neg_entropy = (qbar * torch.log(qbar.clamp_min(1e-12))).sum()
    fit = (w * p * torch.log(prior.clamp_min(QR_PRIOR_FLOOR))).sum() / total
    if pixel_weight.sum() <= 0:
        return logits.sum() * 0.0
    return neg_entropy - fit


def label_loss(
    kind: str,
    outputs: list[Tensor],
    target: Tensor,
    weights: Tensor | None = None,
    allowed: Tensor | None = None,
    prior: PriorSpec | None = None,
) -> dict[str, Tensor]:
    """The ``--label-loss`` ``kind`` (:data:`LABEL_LOSSES`) of a network's heads.

    Args:
        kind: ``plat``, ``ce``, ``prior``, ``prior-plat``, ``lsr`` or ``qr`` (module docs).
        outputs: the heads' logits ``(B, C, H, W)`` (one or two heads).
        target: ``(B, H, W)`` int64 LR labels (legend indices), IGNORE_INDEX where ignored.
        weights: optional class weights, one per LR label value.
        allowed: optional acceptable classes per label (``plat`` and ``ce`` only; see :func:`weighted_ce`).
        prior: the composition table (prior losses only).

    Returns:
        ``{"loss": total, "loss_ce": head 1's term, ...}``: ``loss_mce`` (head 2's term) and
        ``plat_kept`` (``plat``: the mask's share; ``prior-plat``: the share where the prior did not
        overrule head 1) for two heads.
    """
    if kind not in LABEL_LOSSES:
        raise ValueError(f"unknown label loss {kind!r}: {', '.join(LABEL_LOSSES)}")
    if len(outputs) not in (1, 2):
        raise ValueError(f"expected 1 or 2 heads, got {len(outputs)}")
    if kind in ("plat", "ce"):
        if kind == "plat" and len(outputs) == 2:
            total, ce, mce, kept = plat_loss(outputs[0], outputs[1], target, weights, allowed)
            return {"loss": total, "loss_ce": ce, "loss_mce": mce, "plat_kept": kept}
        terms = [weighted_ce(out, target, weights, allowed) for out in outputs]
    else:
        if prior is None:
            raise ValueError(f"--label-loss {kind} needs the composition table")
        q, valid = label_prior(target, prior.mean, prior.blur_px)
        w = _pixel_weights(target, valid, weights)
        if kind == "prior-plat" and len(outputs) == 2:
            total, l1, l2, agree = prior_plat_loss(outputs[0], outputs[1], q, w)
            return {"loss": total, "loss_ce": l1, "loss_mce": l2, "plat_kept": agree}
        if kind == "lsr":
            terms = [lsr_loss(out, target, valid, prior.mean, prior.sigma, weights) for out in outputs]
        elif kind == "qr":
            terms = [qr_loss(out, q, w) for out in outputs]
        else:
            terms = [soft_ce(out, q, w) for out in outputs]
    out = {"loss": sum(terms[1:], terms[0]), "loss_ce": terms[0]}
    if len(terms) == 2:
        out["loss_mce"] = terms[1]
    return out

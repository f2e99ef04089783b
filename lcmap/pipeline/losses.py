"""Training losses: PLAT (pseudo-label-assisted training, Paraformer, CVPR 2024) and class-weighted CE.

PLAT for a two-head network::

    loss = CE_w(head1, y) + CE_w(head2, plat_mask(head1, y))

where ``y`` is the LR label on the 1 m grid (legend indices, IGNORE_INDEX for nodata / outside the
AOI), ``CE_w`` is cross-entropy weighted per class (see :mod:`lcmap.pipeline.class_weights`), and
:func:`plat_mask` keeps ``y`` only where head 1's argmax agrees with it (recomputed every step, no
gradient). A one-head network (the U-Net baseline) gets ``CE_w(logits, y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lcmap.geodata.legends import IGNORE_INDEX

__all__ = ["plat_loss", "plat_mask", "weighted_ce"]


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

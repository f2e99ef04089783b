"""Training losses (:mod:`lcmap.pipeline.training.losses`) and class weights
(:mod:`lcmap.pipeline.training.class_weights`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcmap.geodata.legends import IGNORE_INDEX
from lcmap.pipeline.training.class_weights import inverse_sqrt_frequency_weights
from lcmap.pipeline.training.losses import plat_loss, plat_mask, weighted_ce

I = IGNORE_INDEX  # noqa: E741 - short name for the label tables below


def _logits_for(argmax: list[list[int]], k: int = 3) -> torch.Tensor:
    """(1, k, H, W) logits whose argmax is ``argmax``."""
    a = torch.tensor(argmax)
    return F.one_hot(a, k).permute(2, 0, 1)[None].float() * 4.0


# ------------------------------------------------------------------------------------ PLAT
def test_plat_mask_keeps_label_only_where_head1_agrees():
    head1 = _logits_for([[0, 1, 2], [2, 0, 1]])
    target = torch.tensor([[[0, 2, 2], [I, 1, 1]]])
    mask = plat_mask(head1, target)
    assert mask.tolist() == [[[0, I, 2], [I, I, 1]]]
    assert mask.dtype == torch.int64 and not mask.requires_grad


def test_plat_loss_is_ce_on_labels_plus_ce_on_mask_without_gradient_through_mask():
    torch.manual_seed(0)
    head1 = torch.randn(2, 4, 5, 5, requires_grad=True)
    head2 = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, :] = I
    weights = torch.tensor([0.5, 1.0, 2.0, 0.5])
    total, ce, mce, kept = plat_loss(head1, head2, target, weights)
    mask = plat_mask(head1, target)
    exp_ce = F.cross_entropy(head1, target, weight=weights, ignore_index=I)
    exp_mce = F.cross_entropy(head2, mask, weight=weights, ignore_index=I)
    assert torch.allclose(ce, exp_ce) and torch.allclose(mce, exp_mce)
    assert torch.allclose(total, exp_ce + exp_mce)
    valid = (target != I).sum().item()
    assert kept.item() == pytest.approx((mask != I).sum().item() / valid)
    # head 1 receives gradient only from its own CE (the mask is a constant).
    g1 = torch.autograd.grad(total, head1, retain_graph=True)[0]
    g1_ce = torch.autograd.grad(exp_ce, head1)[0]
    assert torch.allclose(g1, g1_ce)


def test_losses_are_zero_not_nan_without_valid_pixels():
    head = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), I)
    loss = weighted_ce(head, target, torch.ones(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(head.grad).all()
    # A head 1 that agrees nowhere: the masked CE is 0, the total is just the CE.
    head1 = _logits_for([[1, 1], [1, 1]])
    total, ce, mce, kept = plat_loss(head1, torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert mce.item() == 0.0 and kept.item() == 0.0 and torch.isfinite(total)


def test_partial_label_ce_for_mixed_classes_on_a_hand_made_example():
    # 3 classes; label 0 is "mixed": class 1 or 2 (not 0) is acceptable
    allowed = torch.tensor([[False, True, True], [False, True, False], [False, False, True]])
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p = torch.softmax(logits, dim=1)[0, :, 0]
    expected = (-torch.log(p[1, 0] + p[2, 0]) - torch.log(p[1, 1])) / 2
    assert weighted_ce(logits, target, None, allowed).item() == pytest.approx(expected.item(), rel=1e-5)
    w = torch.tensor([3.0, 1.0, 1.0])
    expected_w = (-3 * torch.log(p[1, 0] + p[2, 0]) - torch.log(p[1, 1])) / 4
    assert weighted_ce(logits, target, w, allowed).item() == pytest.approx(expected_w.item(), rel=1e-5)
    # identity rows: exactly the plain (weighted) cross-entropy, ignored pixels included
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    y[0, 0] = I
    ww = torch.tensor([0.5, 1.0, 2.0, 0.7])
    assert weighted_ce(x, y, ww, torch.eye(4, dtype=torch.bool)).item() == pytest.approx(
        F.cross_entropy(x, y, weight=ww, ignore_index=I).item(), rel=1e-5
    )
    # PLAT: head 1 "agrees" with a mixed label where its argmax is any acceptable class
    head1 = _logits_for([[2, 0, 1]])
    mask = plat_mask(head1, torch.tensor([[[0, 0, 1]]]), allowed)
    assert mask.tolist() == [[[0, I, 1]]]


# --------------------------------------------------------------------------- class weights
def test_class_weights_inverse_sqrt_frequency():
    counts = [900, 90, 10, 0, 0]
    occurs = [True, True, True, True, False]
    w = inverse_sqrt_frequency_weights(counts, occurs)
    raw = 1 / np.sqrt(np.array([0.9, 0.09, 0.01]))
    assert np.allclose(w[:3], raw / raw.mean())
    assert w[:3].mean() == pytest.approx(1.0)
    assert w[3] == pytest.approx(w[:3].max())  # in the files, missed by the sampled patches
    assert w[4] == 0.0  # never occurs
    # rare classes are floored at a frequency of 1e-3
    w2 = inverse_sqrt_frequency_weights([10**6, 1])
    assert w2[1] / w2[0] == pytest.approx(np.sqrt(1.0 / 1e-3), rel=1e-3)
    with pytest.raises(ValueError):
        inverse_sqrt_frequency_weights([0, 0])

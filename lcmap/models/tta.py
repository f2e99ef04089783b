"""Test-time augmentation (TTA): class probabilities averaged over flips and rotations of the input.

Each transform of the dihedral group D4 is written ``(k, flip)``: flip the columns (horizontal
flip, last axis) if ``flip``, then rotate by ``k`` x 90° (:func:`torch.rot90` over the last two
axes). Its inverse undoes the rotation, then the flip. Modes:

- ``none``: the identity only (exactly :func:`lcmap.models.predict_proba`);
- ``flips``: identity, horizontal flip, vertical flip, both (= 180° rotation): 4x the model cost;
- ``d4``: the 8 elements of D4 (the 4 rotations, each with and without a flip): 8x the cost.

The ``k`` transformed copies of a batch are stacked along the batch axis and run in ONE model call
(per output shape: a non-square input under ``d4`` needs two, one for 0°/180° and one for
90°/270°); the transformed-back probabilities are summed in the fixed order of the mode's
transforms, then divided by ``k``, so the result does not depend on anything but the input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lcmap.models import predict_proba

__all__ = ["TTA_MODES", "tta_transforms", "apply_transform", "invert_transform", "predict_proba_tta"]

#: The modes, cheapest first.
TTA_MODES = ("none", "flips", "d4")

_TRANSFORMS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    # identity, horizontal flip, vertical flip (= hflip then 180°), both flips (= 180°)
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": ((0, False), (1, False), (2, False), (3, False), (0, True), (1, True), (2, True), (3, True)),
}


def tta_transforms(mode: str) -> tuple[tuple[int, bool], ...]:
    """The transforms ``(k quarter turns, flip columns first)`` of ``mode``, identity first.

    Raises:
        ValueError: ``mode`` is not one of :data:`TTA_MODES`.
    """
    try:
        return _TRANSFORMS[mode]
    except KeyError:
        raise ValueError(f"TTA mode {mode!r}: choose one of {', '.join(TTA_MODES)}") from None


def apply_transform(x: Tensor, k: int, flip: bool) -> Tensor:
    """``(..., H, W)`` -> the transformed tensor (``(..., W, H)`` for odd ``k``)."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def invert_transform(y: Tensor, k: int, flip: bool) -> Tensor:
    """The inverse of :func:`apply_transform`: undo the rotation, then the flip."""
    if k % 4:
        y = torch.rot90(y, -k, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if flip else y


def predict_proba_tta(
    model: nn.Module,
    x: Tensor,
    mode: str = "none",
    proba: Callable[[nn.Module, Tensor], Tensor] = predict_proba,
) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` of ``x`` ``(B, C, H, W)``, averaged over ``mode``'s transforms.

    ``none`` is ``proba(model, x)`` itself (same numbers). Otherwise the transformed copies are
    stacked along the batch axis (``(k * B, C, H, W)``, transform-major) and run in one
    ``proba`` call per output shape; memory in the model grows ``k``-fold.

    Args:
        proba: ``(model, (B, C, H, W)) -> (B, K, H, W)`` probabilities of one batch
            (:func:`lcmap.models.predict_proba`: the mean of the heads' softmax).
    """
    transforms = tta_transforms(mode)
    if len(transforms) == 1:
        return proba(model, x)
    b = x.shape[0]
    # group the transforms by the shape they give (one group when H == W)
    groups: dict[tuple[int, ...], list[int]] = {}
    for t, (k, _flip) in enumerate(transforms):
        shape = tuple(x.shape[-2:]) if k % 2 == 0 else tuple(x.shape[-2:][::-1])
        groups.setdefault(shape, []).append(t)
    back: list[Tensor | None] = [None] * len(transforms)
    for members in groups.values():
        stacked = torch.cat([apply_transform(x, *transforms[t]) for t in members], dim=0)
        probs = proba(model, stacked)
        for n, t in enumerate(members):
            back[t] = invert_transform(probs[n * b : (n + 1) * b], *transforms[t])
    total = back[0]
    assert total is not None
    for p in back[1:]:
        assert p is not None
        total = total + p
    return total / len(transforms)

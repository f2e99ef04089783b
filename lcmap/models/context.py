"""Class probabilities of the imagery only: the model sees the bounding box of the valid pixels,
mirrored to a multiple of the networks' downsampling, never an empty margin.

The one rule shared by ``lcmap predict`` (a window's context box,
:func:`lcmap.pipeline.prediction.strips.context_box`) and validation during ``lcmap train``: pixels outside
the imagery (no file, every band nodata) are not fed to the model around the valid ones; holes
inside the box are fed as the band mean (0 after normalisation), as everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lcmap.models import predict_proba
from lcmap.models.tta import predict_proba_tta

__all__ = ["SIZE_MULTIPLE", "padded_input", "predict_proba_valid", "valid_bbox"]

#: Inputs are mirrored to a multiple of this (the networks downsample by 32).
SIZE_MULTIPLE = 32


def valid_bbox(valid: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(r0, r1, c0, c1)`` of the True pixels of ``valid`` ``(h, w)``, or None."""
    rows = np.flatnonzero(valid.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(valid.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def padded_input(image: np.ndarray, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """``image`` ``(C, h, w)`` mirrored past its bottom/right edge to a multiple of ``multiple`` px."""
    _, h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return image
    if min(h, w) > 1:
        return np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    return np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="edge")


def predict_proba_valid(
    model: nn.Module,
    image: np.ndarray,
    valid: np.ndarray,
    tta: str = "none",
    proba: Callable[[nn.Module, Tensor], Tensor] = predict_proba,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, tuple[int, int, int, int]] | None:
    """Probabilities ``(K, h, w)`` of the valid box of one normalised image, and that box.

    Args:
        image: ``(C, H, W)`` float32, normalised (invalid pixels already 0).
        valid: ``(H, W)`` bool.

    Returns:
        ``(probs (K, r1 - r0, c1 - c0) float32, (r0, r1, c0, c1))``, or None without a valid pixel.
    """
    box = valid_bbox(valid)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    x = np.ascontiguousarray(padded_input(image[:, r0:r1, c0:c1]))
    p = predict_proba_tta(model, torch.from_numpy(x)[None].to(device), tta, proba).float()[0]
    return p[:, : r1 - r0, : c1 - c0], box

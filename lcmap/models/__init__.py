"""Networks: Paraformer (CNN + ViT, two heads) and the U-Net baseline.

Every model maps ``(B, C, H, W)`` float imagery to a list of logits tensors ``(B, K, H, W)``:
two for Paraformer (head 1: CNN branch, head 2: Transformer branch), one for the U-Net.
:func:`predict_proba` averages the heads' softmax, as Paraformer does at inference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

MODEL_NAMES = ("paraformer", "paraformer-tiny", "unet")


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    vit_weights: str | Path | None = None,
) -> nn.Module:
    """Build a network by name.

    Args:
        name: ``paraformer`` (the paper's size), ``paraformer-tiny`` (CPU-sized) or ``unet``.
        in_channels: number of image bands.
        num_classes: number of output classes (the LR legend's classes).
        vit_weights: optional local file with pretrained ViT weights (Paraformer only).
    """
    if name in ("paraformer", "paraformer-tiny"):
        from lcmap.models.paraformer import build_paraformer

        return build_paraformer(name, in_channels, num_classes, vit_weights=vit_weights)
    if name == "unet":
        if vit_weights is not None:
            raise ValueError("--vit-weights applies to Paraformer models only, not to the U-Net")
        from lcmap.models.unet import UNet

        return UNet(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")


def build_model_with_weights(name: str, in_channels: int, num_classes: int, state: dict[str, Tensor]) -> nn.Module:
    """Network ``name`` (see :func:`build_model`) holding the weights ``state`` (strict: every key must fit).

    Built on PyTorch's ``meta`` device and given the checkpoint's tensors (``assign=True``), so the
    random initialisation that the weights overwrite anyway is skipped (0.13 s for the U-Net, more
    for Paraformer, in every worker that loads a model). A network that keeps a tensor the
    checkpoint does not hold (a non-persistent buffer) is built the ordinary way instead.
    """
    try:
        with torch.device("meta"):
            model = build_model(name, in_channels, num_classes)
        model.load_state_dict(state, assign=True)
    except NotImplementedError:  # an operation without a meta kernel in a constructor
        model = None
    if model is None or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_model(name, in_channels, num_classes)
        model.load_state_dict(state)
    return model


def non_finite_tensors(state: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding a NaN or an infinity (in
    ``state``'s order): a network with such a weight gives NaN logits, whose argmax is class 0
    everywhere."""
    return [k for k, t in state.items() if t.is_floating_point() and not _finite(t)]


def _finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: its smallest and largest (``torch.aminmax`` keeps a
    NaN and an infinity; one pass without a boolean temporary, ~13x faster than ``isfinite().all()``:
    0.04 -> 0.003 s for a U-Net checkpoint, paid by every map and every worker)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def sum_probabilities(probs: Tensor, group: Tensor, n_groups: int, out: Tensor | None = None) -> Tensor:
    """``(B, K, H, W)`` -> ``(B, n_groups, H, W)``: channel ``k`` added into channel ``group[k]``.

    With ``group = legend.index_to_target_group()``, the probability of each target class (and, in
    the last channel, of the classes without a target). ``out``: a buffer of that shape to reuse
    (a fresh one per call costs page faults: ~5x the summing itself for 4 windows of 512 px).
    """
    shape = (probs.shape[0], n_groups) + tuple(probs.shape[2:])
    if out is None or tuple(out.shape) != shape or out.dtype != probs.dtype or out.device != probs.device:
        out = torch.empty(shape, dtype=probs.dtype, device=probs.device)
    out.zero_()
    return out.index_add_(1, group.to(probs.device), probs)


def predict_proba(model: nn.Module, x: Tensor) -> Tensor:
    """Class probabilities ``(B, K, H, W)``: the mean of the heads' softmax."""
    outputs = model(x)
    probs = torch.softmax(outputs[0].float(), dim=1)
    for out in outputs[1:]:
        probs = probs + torch.softmax(out.float(), dim=1)
    return probs / len(outputs)

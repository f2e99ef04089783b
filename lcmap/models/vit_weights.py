"""Load pretrained ViT encoder weights from a LOCAL file into a Paraformer's Transformer branch.

Nothing is downloaded. Supported files:

* timm / PyTorch checkpoints (``.pth``, ``.pt``, ``.bin``, ``.ckpt``): a state dict, possibly nested
  under ``"state_dict"`` or ``"model"``, with timm ``VisionTransformer`` names (``blocks.N.*``,
  ``norm.*``, ``pos_embed``), possibly behind a prefix such as ``module.`` or ``vit.``;
* ``.safetensors`` files with the same names (e.g. timm's Hugging Face exports);
* Google's JAX ``.npz`` checkpoints (e.g. ImageNet-21k ``ViT-B_16.npz``; also big_vision names).

What is loaded: every encoder block, the final LayerNorm and the position embeddings (the CLS /
other prefix-token positions are dropped and the grid is resized bicubically to the model's base
grid, 14 x 14). The patch embedding, CLS token and classifier head are ignored: Paraformer's tokens
come from its CNN branch through a 1x1 conv that is trained from scratch.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcmap.errors import LcmapInputError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
NPZ_SUFFIXES = (".npz",)
_MAX_PREFIX_TOKENS = 8  # CLS, distillation and register tokens that may precede the grid


def load_vit_weights(paraformer_model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy pretrained ViT weights from a local file into ``paraformer_model.vit``.

    Args:
        paraformer_model: a :class:`lcmap.models.paraformer.Paraformer` (anything with a ``vit``
            :class:`~lcmap.models.paraformer.TransformerBranch`).
        path: local ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``, ``.safetensors`` or ``.npz`` file.

    Returns:
        ``{"loaded": n, "skipped": n, "missing": n, "format": str}``: model tensors set from the
        file, file tensors not used (patch embedding, CLS token, head, ...), ViT tensors of the model
        that the file lacks (left at their initial values), and the file format.

    Raises:
        LcmapInputError: the file is missing or unreadable, its format is unknown, it holds no ViT
            encoder, or its hidden size, depth, head count or any tensor shape does not fit the model.
    """
    path = Path(path)
    vit = getattr(paraformer_model, "vit", None)
    if vit is None or not hasattr(vit, "blocks"):
        raise TypeError("load_vit_weights needs a Paraformer (a model with a .vit Transformer branch)")
    if not path.is_file():
        raise LcmapInputError(
            f"ViT weights file {path} does not exist (or is not a file); pass a local .pth, .pt, "
            ".bin, .safetensors or .npz file (nothing is downloaded)"
        )
    suffix = path.suffix.lower()
    file_heads: set[int] = set()
    if suffix in TORCH_SUFFIXES:
        fmt, raw = "torch", _read_torch(path)
        state, skipped = _select_timm(raw, path)
    elif suffix in SAFETENSORS_SUFFIXES:
        fmt, raw = "safetensors", _read_safetensors(path)
        state, skipped = _select_timm(raw, path)
    elif suffix in NPZ_SUFFIXES:
        fmt = "npz"
        state, skipped, file_heads = _read_npz(path)
    else:
        raise LcmapInputError(
            f"ViT weights file {path}: unknown format {path.suffix or '(no suffix)'!r}; use a timm "
            "checkpoint (.pth/.pt/.bin/.ckpt), a .safetensors file or a Google ViT .npz file"
        )
    loaded, missing, unused = _copy_into(vit, state, path, file_heads)
    if missing:
        log.warning(
            "ViT weights file %s lacks %d model tensors (kept at init): %s",
            path,
            len(missing),
            ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""),
        )
    return {"loaded": loaded, "skipped": skipped + unused, "missing": len(missing), "format": fmt}


# ----------------------------------------------------------------------------- readers


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or weights-only errors
        # torch's weights-only message advises loading unsafely (running the file's code): not quoted
        reason = "it holds more than weights and plain values" if "weights_only" in str(exc) else str(exc)
        raise LcmapInputError(f"could not read ViT weights file {path} as a PyTorch checkpoint: {reason}") from None
    for _ in range(3):  # unwrap {"state_dict": {...}} / {"model": {...}}, possibly nested
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, dict):
        raise LcmapInputError(f"ViT weights file {path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise LcmapInputError(f"could not read ViT weights file {path} as safetensors: {exc}") from exc


def _select_timm(raw: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], int]:
    """Pick the encoder tensors out of a timm-named state dict; strip any prefix (``module.`` ...).

    Returns:
        The tensors renamed to ``blocks.N.*``, ``norm.*``, ``pos_embed``, and the number skipped.
    """
    prefixes = [m.group(1) for k in raw if (m := re.match(r"^(|.*\.)blocks\.0\.norm1\.weight$", k)) is not None]
    if not prefixes:
        sample = ", ".join(list(raw)[:5])
        raise LcmapInputError(
            f"ViT weights file {path} holds no timm ViT encoder (no 'blocks.0.norm1.weight' key; "
            f"found {len(raw)} tensors, e.g. {sample or 'none'})"
        )
    prefix = min(prefixes, key=len)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix) :]
        if rel.startswith("blocks.") or rel.startswith("norm.") or rel == "pos_embed":
            state[rel] = value
    return state, len(raw) - len(state)


def _read_npz(path: Path) -> tuple[dict[str, Tensor], int, set[int]]:
    """Convert a Google / big_vision ViT ``.npz`` into timm names (encoder tensors only).

    Returns:
        The encoder tensors with timm names, the number of arrays not used, and the attention head
        counts found (a timm state dict does not record heads; a Google one does).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise LcmapInputError(f"could not read ViT weights file {path} as a NumPy .npz: {exc}") from exc

    prefixes = sorted(
        {m.group(1) for k in arrays if (m := re.match(r"^(.*?)Transformer/encoder", k)) is not None},
        key=len,
    )
    if not prefixes:
        raise LcmapInputError(
            f"ViT weights file {path} holds no Google ViT encoder (no 'Transformer/encoderblock_*' "
            f"arrays; found e.g. {', '.join(list(arrays)[:5]) or 'none'})"
        )
    pre = prefixes[0] + "Transformer/"
    used: set[str] = set()
    heads: set[int] = set()

    def get(key: str) -> np.ndarray:
        used.add(key)
        return arrays[key]

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    # Per-block arrays: "encoderblock_{i}/..." (Google) or one stacked "encoderblock/..." (scanned).
    blocks: dict[int, dict[str, np.ndarray]] = {}
    for key in arrays:
        if not key.startswith(pre):
            continue
        rel = key[len(pre) :]
        if m := re.match(r"^encoderblock_(\d+)/(.+)$", rel):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = get(key)
        elif m := re.match(r"^encoderblock/(.+)$", rel):
            stacked = get(key)
            for i in range(stacked.shape[0]):
                blocks.setdefault(i, {})[m.group(1)] = stacked[i]

    try:
        state = _convert_npz_blocks(blocks, heads, path, t)
    except KeyError as exc:
        raise LcmapInputError(
            f"ViT weights file {path}: an encoder block lacks the array {exc}; is it a ViT checkpoint?"
        ) from exc
    for src, tgt in (("scale", "weight"), ("bias", "bias")):
        if (key := f"{pre}encoder_norm/{src}") in arrays:
            state[f"norm.{tgt}"] = t(get(key))
    for key in (f"{pre}posembed_input/pos_embedding", f"{prefixes[0]}pos_embedding"):
        if key in arrays:
            state["pos_embed"] = t(get(key))
            break
    return state, len(arrays) - len(used), heads


def _convert_npz_blocks(
    blocks: dict[int, dict[str, np.ndarray]], heads: set[int], path: Path, t: Any
) -> dict[str, Tensor]:
    """Google encoder-block arrays (per block: ``LayerNorm_*``, ``MultiHeadDotProductAttention_*``,
    ``MlpBlock_*``) -> timm ``blocks.N.*`` tensors; adds the blocks' head counts to ``heads``."""
    state: dict[str, Tensor] = {}
    for i, arrs in sorted(blocks.items()):
        names = {n.split("/")[0] for n in arrs}
        lns = sorted((n for n in names if n.startswith("LayerNorm_")), key=lambda n: int(n.split("_")[1]))
        mha = [n for n in names if n.startswith("MultiHeadDotProductAttention_")]
        mlp = [n for n in names if n.startswith("MlpBlock_")]
        if len(lns) != 2 or len(mha) != 1 or len(mlp) != 1:
            raise LcmapInputError(
                f"ViT weights file {path}: encoder block {i} has an unexpected layout "
                f"(sub-modules {sorted(names)}); expected 2 LayerNorm, 1 attention and 1 MLP block"
            )
        b = f"blocks.{i}."
        for ln, tgt in zip(lns, ("norm1", "norm2"), strict=True):
            state[b + tgt + ".weight"] = t(arrs[f"{ln}/scale"])
            state[b + tgt + ".bias"] = t(arrs[f"{ln}/bias"])
        a = mha[0]
        q = arrs[f"{a}/query/kernel"]  # (D, heads, head_dim)
        if q.ndim == 3:
            heads.add(int(q.shape[1]))
        qkv_w = [arrs[f"{a}/{n}/kernel"] for n in ("query", "key", "value")]
        state[b + "attn.qkv.weight"] = torch.cat([t(w.reshape(w.shape[0], -1).T) for w in qkv_w])
        if f"{a}/query/bias" in arrs:
            state[b + "attn.qkv.bias"] = torch.cat(
                [t(arrs[f"{a}/{n}/bias"].reshape(-1)) for n in ("query", "key", "value")]
            )
        out = arrs[f"{a}/out/kernel"]  # (heads, head_dim, D)
        state[b + "attn.proj.weight"] = t(out.reshape(-1, out.shape[-1]).T)
        state[b + "attn.proj.bias"] = t(arrs[f"{a}/out/bias"])
        for dense, tgt in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            state[b + f"mlp.{tgt}.weight"] = t(arrs[f"{mlp[0]}/{dense}/kernel"].T)
            state[b + f"mlp.{tgt}.bias"] = t(arrs[f"{mlp[0]}/{dense}/bias"])
    return state


# ----------------------------------------------------------------------------- checks and copy


def _fit_pos_embed(pe: Tensor, base_grid: int, hidden: int, path: Path) -> Tensor:
    """File position embeddings ``(1, [prefix +] g*g, D)`` -> ``(1, base_grid**2, D)``."""
    if pe.ndim == 2:
        pe = pe.unsqueeze(0)
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != hidden:
        raise LcmapInputError(
            f"ViT weights file {path} does not fit the model: position embeddings of shape "
            f"{tuple(pe.shape)}, expected (1, N, {hidden})"
        )
    n = pe.shape[1]
    for k in range(_MAX_PREFIX_TOKENS + 1):  # g*g + k is never a square for 0 < k <= 2g
        g = math.isqrt(n - k) if n > k else 0
        if g > 0 and g * g == n - k:
            break
    else:
        raise LcmapInputError(f"ViT weights file {path}: {n} position embeddings do not form a square token grid")
    grid = pe[:, k:].reshape(1, g, g, hidden).permute(0, 3, 1, 2).float()
    if g != base_grid:
        grid = F.interpolate(
            grid, size=(base_grid, base_grid), mode="bicubic", align_corners=False, antialias=g > base_grid
        )
    return grid.flatten(2).transpose(1, 2)


def _copy_into(vit: Any, state: dict[str, Tensor], path: Path, file_heads: set[int]) -> tuple[int, list[str], int]:
    """Check the file's encoder (and its head counts, when known) against ``vit`` (a Paraformer
    ``TransformerBranch``: ``hidden_size``, ``base_grid``, ``blocks``) and copy it.

    Returns:
        ``(loaded, missing, unused)``: tensors copied, names of model tensors absent from the
        file, and the number of encoder tensors in the file the model has no place for.
    """
    hidden = vit.hidden_size
    depth = len(vit.blocks)
    if "blocks.0.norm1.weight" in state:
        found = tuple(state["blocks.0.norm1.weight"].shape)
        if found != (hidden,):
            raise LcmapInputError(
                f"ViT weights file {path} does not fit the model: hidden size {found[0] if found else '?'} "
                f"in the file (blocks.0.norm1.weight shape {found}), the model expects {hidden} "
                f"(shape ({hidden},))"
            )
    file_depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if file_depth != depth:
        raise LcmapInputError(
            f"ViT weights file {path} does not fit the model: {file_depth} encoder blocks in the "
            f"file, the model has {depth}"
        )
    num_heads = vit.blocks[0].attn.num_heads if depth else None
    if file_heads and file_heads != {num_heads}:
        raise LcmapInputError(
            f"ViT weights file {path} does not fit the model: {', '.join(map(str, sorted(file_heads)))} "
            f"attention heads in the file, the model expects {num_heads}"
        )
    if "pos_embed" in state:
        state = dict(state)
        state["pos_embed"] = _fit_pos_embed(state["pos_embed"], vit.base_grid, hidden, path)

    params = dict(vit.named_parameters())
    targets = {k: v for k, v in params.items() if k.startswith(("blocks.", "norm.")) or k == "pos_embed"}
    for key, value in state.items():
        if key not in targets:
            continue
        if tuple(value.shape) != tuple(targets[key].shape):
            raise LcmapInputError(
                f"ViT weights file {path} does not fit the model: {key} has shape "
                f"{tuple(value.shape)} in the file, the model expects {tuple(targets[key].shape)}"
            )
    unexpected = sorted(k for k in state if k not in targets)
    if unexpected:
        log.warning(
            "ViT weights file %s: %d encoder tensors the model has no place for (ignored): %s",
            path,
            len(unexpected),
            ", ".join(unexpected[:6]),
        )
    loaded = 0
    with torch.no_grad():
        for key, param in targets.items():
            if key in state:
                param.copy_(state[key].to(dtype=param.dtype, device=param.device))
                loaded += 1
    missing = sorted(k for k in targets if k not in state)
    return loaded, missing, len(unexpected)


__all__ = ["load_vit_weights"]

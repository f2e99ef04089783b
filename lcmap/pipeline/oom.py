"""Out-of-memory errors of training, turned into a message that says which option to change."""

from __future__ import annotations

from typing import Any

from lcmap.errors import LcmapInputError

__all__ = ["raise_if_out_of_memory"]


def raise_if_out_of_memory(exc: BaseException, config: Any, patch_px: int) -> None:
    """Raise :class:`LcmapInputError` (from ``exc``) when ``exc`` is an out-of-memory error; else return.

    Args:
        exc: the error training raised.
        config: the :class:`~lcmap.pipeline.config.TrainConfig` (``batch_size``, ``model``).
        patch_px: the training patch side (px).

    The message names the batch size and patch side used and what to try: half the batch size,
    or (at batch size 1) half the patch side, or bf16 mixed precision.
    """
    import torch

    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if t is not None
    )
    is_torch_oom = bool(oom_types) and isinstance(exc, oom_types)
    text = str(exc)
    # a RuntimeError whose text says "out of memory" is how older torch and some backends report it
    if not (is_torch_oom or "out of memory" in text.lower() or isinstance(exc, MemoryError)):
        return
    half = max(1, config.batch_size // 2)
    where = "GPU" if "cuda" in text.lower() or is_torch_oom else "memory"
    hint = (
        f"try --batch-size {half}"
        if config.batch_size > 1
        else f"try a smaller --patch-px (e.g. {max(32, (patch_px // 2) // 32 * 32)})"
    )
    raise LcmapInputError(
        f"out of {where} with --batch-size {config.batch_size} and {patch_px} px patches "
        f"({config.model}): {hint}, or --precision bf16-mixed on a GPU"
    ) from exc

"""Training running out of memory or disk, turned into a message that says what to do: which option
to change (memory), or to free space and resume or rerun (disk; a run folder this run created
without a checkpoint is removed, one holding ``last.ckpt`` is kept for ``--resume``)."""

from __future__ import annotations

import errno
import shutil
from typing import Any

from lcmap.errors import DiskFullError, LcmapInputError

__all__ = ["raise_if_disk_full", "raise_if_out_of_memory"]

#: A failed write with less than this free (bytes) in the run folder failed for want of space.
_FULL_BELOW_BYTES = 1 << 20


def raise_if_out_of_memory(exc: BaseException, config: Any, patch_px: int) -> None:
    """Raise :class:`LcmapInputError` (from ``exc``) when ``exc`` is an out-of-memory error; else return.

    Args:
        exc: the error training raised.
        config: the :class:`~lcmap.pipeline.training.config.TrainConfig` (``batch_size``, ``model``).
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


def raise_if_disk_full(exc: BaseException, run: Any, created: Any) -> None:
    """Raise :class:`DiskFullError` (from ``exc``) when training failed for want of disk space; else return.

    A full disk is ENOSPC in ``exc``'s chain, or a write failure (``OSError``, or the ``RuntimeError``
    torch raises when a checkpoint write fails) while under 1 MiB is free in the run folder. The
    folder is then removed if this run created it (``created``: what :meth:`RunFolder.create
    <lcmap.pipeline.runs.RunFolder.create>` returned) and it holds no checkpoint, so the same
    command runs again; with a ``last.ckpt`` the message says how to resume.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    if not full and isinstance(exc, (OSError, RuntimeError)):
        folder = next((p for p in (run.path, *run.path.parents) if p.exists()), None)
        try:
            full = folder is not None and shutil.disk_usage(folder).free < _FULL_BELOW_BYTES
        except OSError:
            full = False
    if not full:
        return
    run.remove_created(created)
    step = run.saved_step()
    if step is not None:
        then = f"{run.last_ckpt} holds step {step}: free some space and continue with --resume"
    else:
        then = "no checkpoint was written; free some space and run the same command again"
    name = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
    writing = f" (writing {name})" if name else ""
    raise DiskFullError(f"the disk is full while training into {run.path}{writing}: {then}") from exc

"""SIGTERM (sent by batch schedulers: Slurm, PBS, Kubernetes) handled like Ctrl-C during ``lcmap train``."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["sigterm_as_interrupt"]


@contextmanager
def sigterm_as_interrupt() -> Iterator[dict[str, bool]]:
    """SIGTERM handled as Ctrl-C for the duration of the block; yields a mutable state dict.

    While ``state["fitting"]`` is False, SIGTERM raises KeyboardInterrupt (as Ctrl-C would). Once the
    caller sets it (just before ``trainer.fit``), Lightning's own handler, which calls this one after
    its own, stops the loop at the next batch boundary (``SIGTERMException``) and
    :class:`~lcmap.pipeline.training.callbacks.SaveOnInterrupt` saves ``last.ckpt``; this handler then does
    nothing. Outside the main thread (where signals cannot be handled) nothing is installed.
    """
    state = {"fitting": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if not state["fitting"]:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)

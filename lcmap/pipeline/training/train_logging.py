"""Logging during ``lcmap train``: lcmap's lines into RUN_DIR/train.log, Lightning's lines once, its noise dropped."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["lcmap_logging", "lightning_logging"]


@contextlib.contextmanager
def lightning_logging() -> Iterator[None]:
    """During a run: Lightning's lines once (not also through the root logger), its noise filtered."""
    lightning_console = _lightning_console_handlers()
    lightning_logger = logging.getLogger("lightning")
    for h in lightning_console:
        lightning_logger.removeHandler(h)
    quiet = _QuietLightning()
    try:
        with quiet:
            yield
    finally:
        for h in lightning_console:
            lightning_logger.addHandler(h)


@contextlib.contextmanager
def lcmap_logging(log_path: Path, is_zero: bool) -> Iterator[None]:
    """During a run: lcmap's log into RUN_DIR/train.log on rank 0; the other ranks of a DDP run
    (which run the same steps) print only warnings and errors, so each line appears once."""
    lcmap_logger = logging.getLogger("lcmap")
    handlers = _setup_logging(log_path, is_zero)
    level = lcmap_logger.level
    if not is_zero:
        lcmap_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lcmap_logger.setLevel(level)
        for h in handlers:
            lcmap_logger.removeHandler(h)
            h.close()


def _lightning_console_handlers() -> list[logging.Handler]:
    """The console handler ``import lightning`` puts on the ``lightning`` logger, when the root logger
    prints too (the ``lcmap`` command's rich handler): Lightning's lines would then appear twice."""
    root_prints = any(not isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)
    if not root_prints or not logging.getLogger("lightning").propagate:
        return []
    return [
        h
        for h in logging.getLogger("lightning").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def _setup_logging(log_path: Path, is_rank_zero: bool) -> list[logging.Handler]:
    """A file handler on RUN_DIR/train.log (rank 0), and console output when nothing else prints."""
    handlers: list[logging.Handler] = []
    lcmap_logger = logging.getLogger("lcmap")
    lcmap_logger.setLevel(logging.INFO)
    if is_rank_zero:
        fh = logging.FileHandler(log_path, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        fh.setLevel(logging.INFO)
        lcmap_logger.addHandler(fh)
        handlers.append(fh)
        has_console = any(not isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers) or any(
            not isinstance(h, logging.FileHandler) for h in lcmap_logger.handlers
        )
        if not has_console:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            sh.setLevel(logging.INFO)
            lcmap_logger.addHandler(sh)
            handlers.append(sh)
    return handlers


class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tip, its device lines and known-harmless deprecation warnings during a run."""

    _LOGGER = "lightning.pytorch.utilities.rank_zero"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # "GPU/TPU available" come when the trainer is built, before the run's first line; lcmap says
        # the device it trains on after it (lcmap.pipeline.training.trainer.log_devices)
        return "litlogger" not in message and not message.startswith(("GPU available:", "TPU available:"))

    def __enter__(self) -> _QuietLightning:
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        logging.getLogger(self._LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger(self._LOGGER).removeFilter(self)
        self._warnings.__exit__(*exc)

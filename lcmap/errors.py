"""lcmap's errors: one small hierarchy, mapped to exit codes by the CLI (:mod:`lcmap.cli`).

Every message names the file or condition and what to do about it; nothing is recognised by its
text. Exit codes: :class:`LcmapInputError` and its subclasses 2; :class:`Interrupted` 130.

- :class:`LcmapInputError`: bad input (file, CRS, AOI, legend, option) found before or during work.
- :class:`AOITooSmallError`: the AOI is too small or thin to draw a patch from.
- :class:`UnsafeCheckpointError`: a checkpoint holds pickled code, not only weights; refused.
- :class:`DiskFullError`: no space left while writing an output (also an :class:`OSError`, ENOSPC).
- :class:`OutputLockedError`: another lcmap process is writing the same output (its ``pid``).
- :class:`ImageryMismatchError`: the imagery's data type or value range differs from the model's
  training imagery.
- :class:`Interrupted` / :class:`TrainingInterrupted`: Ctrl-C or SIGTERM; the message says what
  was kept and how to resume.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "AOITooSmallError",
    "DiskFullError",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "ImageryMismatchError",
    "Interrupted",
    "LcmapError",
    "LcmapInputError",
    "OutputLockedError",
    "TrainingInterrupted",
    "UnsafeCheckpointError",
]

#: Exit status for bad input, a full disk, an AOI too small: the user can fix it.
EXIT_INPUT = 2
#: Exit status after Ctrl-C / SIGTERM (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class LcmapError(Exception):
    """Base of lcmap's own errors (not raised by itself)."""


class LcmapInputError(LcmapError):
    """Bad input (file, CRS, AOI, legend, ...). The CLI prints its message and exits with code 2."""


class UnsafeCheckpointError(LcmapInputError):
    """A checkpoint holds pickled Python objects beyond weights and plain values (it could run code)."""


class AOITooSmallError(LcmapInputError):
    """The AOI (or the data inside it) is too small or thin to draw patches from."""


class DiskFullError(LcmapInputError, OSError):
    """No space left on the device while writing an output (errno ENOSPC)."""

    def __init__(self, message: str) -> None:
        LcmapInputError.__init__(self, message)
        self.errno = errno.ENOSPC
        self.strerror = message

    def __str__(self) -> str:
        return str(self.strerror)


class OutputLockedError(LcmapInputError):
    """Another lcmap process holds the lock on this output; ``pid`` is its process id (None if unknown)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.pid))


class ImageryMismatchError(LcmapInputError):
    """The imagery's data type or value range is not that of the model's training imagery."""


class Interrupted(KeyboardInterrupt):
    """The user (Ctrl-C) or a batch scheduler (SIGTERM) stopped a run; the message says what was kept."""


class TrainingInterrupted(Interrupted):
    """Training stopped; ``run_dir/checkpoints/last.ckpt`` holds step ``global_step`` (None: no checkpoint).

    Args:
        run_dir: the RUN_DIR.
        global_step: the optimizer step saved in ``last.ckpt`` (what ``--resume`` continues from),
            None when the run stopped before its first checkpoint.
        resume_command: the command that continues the run (default: ``lcmap train --out RUN_DIR --resume``).
    """

    def __init__(self, run_dir: Path, global_step: int | None, resume_command: str | None = None) -> None:
        command = resume_command or f"lcmap train --out {run_dir} --resume"
        if global_step is None:
            message = f"training interrupted before its first checkpoint; nothing to resume in {run_dir}: start again"
        else:
            message = (
                f"training interrupted; {run_dir / 'checkpoints' / 'last.ckpt'} saved at step {global_step}. "
                f"Continue with: {command}"
            )
        super().__init__(message)
        self.run_dir = run_dir
        self.global_step = global_step
        self.resume_command = command

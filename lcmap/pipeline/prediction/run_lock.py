"""Which run owns ``MAP.tif.partial``: the run's token in the lock file, and the test a worker makes
before a block file appears.

:func:`lcmap.pipeline.prediction.mapfile.lock_partial` takes the OS lock on ``MAP.tif.partial/.lock`` and
writes the owner's pid and a fresh token into it (:class:`RunLock`); the token is removed when the
run no longer wants block files (:meth:`RunLock.revoke`: the scheduler was lost, the run was
stopped, or it ended). A Dask task does not stop when its run does: the scheduler that could
cancel it may be gone, and a running task cannot be interrupted. So a worker asks
:func:`run_is_over` just before each block file appears and writes nothing once the token is gone,
belongs to another run, or nobody holds the lock (the run's process died): after ``lcmap predict``
exits, however it exits, no block file of its run appears.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path

from lcmap.errors import OutputLockedError

__all__ = ["RunLock", "RunOver", "check_not_locked", "check_run", "locked_error", "run_is_over"]


def locked_error(out: Path, lock_text: bytes) -> OutputLockedError:
    """The refusal of a second run on ``out``, naming the holder's pid (first word of its lock file)."""
    words = lock_text.decode(errors="replace").split()
    pid = words[0] if words else "unknown"
    return OutputLockedError(
        f"{out} is being written by another lcmap process (pid {pid}). Wait for it to finish, stop it, or choose "
        "another --out.",
        pid=int(pid) if pid.isdigit() else None,
    )


def check_not_locked(out: str | Path) -> None:
    """Refuse at once, creating nothing, a map ``out`` whose ``MAP.tif.partial`` another process holds.

    Asked before the model, the imagery and any Dask cluster are loaded (seconds, where taking the
    lock itself waits for planning); :func:`lcmap.pipeline.prediction.mapfile.lock_partial` stays the lock that
    counts.

    Raises:
        OutputLockedError: the lock is held (the message names ``out`` and the holder's pid).
    """
    out = Path(out)
    lock = out.with_name(out.name + ".partial") / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # no lock file: nobody holds it (or it is not ours to judge: lock_partial decides)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise locked_error(out, os.pread(fd, 64, 0)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """One run's hold on ``MAP.tif.partial`` (:func:`lcmap.pipeline.prediction.mapfile.lock_partial` makes it):
    the lock file ``path``, open as ``fd`` under the OS lock, and the run's ``token``, which the file
    holds (second line, after the pid) while the run wants block files."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd
        self.token = uuid.uuid4().hex

    @property
    def owner(self) -> tuple[str, str]:
        """``(lock file, token)``: what a task passes to :func:`lcmap.pipeline.prediction.mapfile.write_block`."""
        return str(self.path), self.token

    def claim(self) -> None:
        """Write the pid and the token: block files of this run may appear."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n{self.token}\n".encode(), 0)

    def revoke(self) -> None:
        """No more block files for this run: tasks still running (a lost scheduler's, after
        Ctrl-C) write none from now on (:func:`run_is_over`). The OS lock stays held; errors are
        ignored (the folder may be gone already)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)


def run_is_over(owner: tuple[str, str]) -> str | None:
    """Why the run ``owner`` (:attr:`RunLock.owner`) no longer wants block files, or None while it does.

    Over when its lock file is gone, holds another token (revoked, or another run's), or is not
    locked by anyone (the run's process died). A worker asks this just before a block file
    appears, so that a task outliving its run (its scheduler lost, its ``lcmap predict``
    stopped or killed) does not go on writing into the folder.
    """
    path, token = owner
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "its MAP.tif.partial folder is gone"
    try:
        words = os.pread(fd, 64, 0).decode(errors="replace").split()
        if len(words) < 2 or words[1] != token:
            return "the run has ended"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its process holds the lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "the process of the run has died"
    finally:
        os.close(fd)


class RunOver(Exception):
    """A block was not written: the run that asked for it has ended (:func:`run_is_over`)."""


def check_run(owner: tuple[str, str] | None, what: str) -> None:
    """Raise :class:`RunOver` (naming ``what``) when the run ``owner`` is over; None: no check."""
    over = run_is_over(owner) if owner is not None else None
    if over is not None:
        raise RunOver(f"{what} not written: {over}")

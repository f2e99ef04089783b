"""One writer per output folder: an OS lock on ``FOLDER/.lock`` (``fcntl.flock``).

``lcmap predict`` holds it on ``MAP.tif.partial`` (:func:`lcmap.pipeline.prediction.mapfile.lock_partial`),
``lcmap train`` on RUN_DIR, for the whole run. A second run on the same folder is refused at once
(:class:`~lcmap.errors.OutputLockedError`, with the owner's pid, which the lock file holds). The
kernel releases the lock when the owner dies, even by SIGKILL, so a stale ``.lock`` file (its pid
dead) is simply locked again. The lock file is opened without following a symlink: a planted
``.lock`` link is refused, never truncated through.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lcmap.errors import LcmapInputError, OutputLockedError

__all__ = ["LOCK_NAME", "hold_folder_lock"]

#: The lock file inside the locked folder.
LOCK_NAME = ".lock"


@contextmanager
def hold_folder_lock(folder: Path, what: str, remove: bool = False) -> Iterator[Path]:
    """Hold the OS lock on ``folder/.lock`` while the body runs; ``folder`` is created.

    Args:
        folder: the folder to lock.
        what: the output named in the refusal, e.g. ``"/data/map.tif"`` or ``"run folder /data/run"``.
        remove: remove the lock file when the body ends (a waiting process then locks a new one).

    The lock is released when the body ends or the process dies; it is still held while the body
    removes ``folder``.

    Raises:
        OutputLockedError: another process holds the lock (the message names ``what`` and its pid).
        LcmapInputError: ``folder/.lock`` is a symlink or cannot be created.
    """
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            why = "is a symlink (refused: lcmap follows none there)" if exc.errno == errno.ELOOP else exc.strerror
            raise LcmapInputError(f"{lock} {why}: move it away or choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.pread(fd, 64, 0).decode(errors="replace").split()  # pid (then a run's token)
            pid = words[0] if words else "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{what} is being written by another lcmap process (pid {pid}). Wait for it to finish, "
                "stop it, or choose another --out.",
                pid=int(pid) if pid.isdigit() else None,
            ) from None
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous owner removed the folder or file after we opened it
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        if remove:
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
        os.close(fd)  # releases the lock

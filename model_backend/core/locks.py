"""Advisory file locks: one writer at a time for a shared file or folder, across processes.

Two QGIS windows, a Processing batch and a script can all touch the same index cache and model
registry. An OS lock on a small lock file (flock on POSIX, msvcrt on Windows) is released by the
OS when its holder dies, so a `kill -9` never leaves a stale lock behind, unlike a "lock exists"
marker file. A waiter polls, so it can report that it waits and honour a cancel request.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from model_backend.core.errors import Cancelled, InputError

POLL_S = 0.1


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def file_lock(path: str | os.PathLike[str], *, timeout_s: float | None = None,
              on_wait: Callable[[], None] | None = None, cancel: Callable[[], bool] | None = None,
              what: str = "this file") -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block.

    `on_wait` is called once when another process holds it; `timeout_s` (None: wait as long as
    it takes) ends the wait with a one-line InputError naming `what`; `cancel()` ends it with
    Cancelled.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"Cannot lock {what} at {p} ({exc.strerror}); check the folder's permissions.") from None
    try:
        start = time.monotonic()
        told = False
        while not _try_lock(fd):
            if not told and on_wait:
                on_wait()
            told = True
            if cancel and cancel():
                raise Cancelled()
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise InputError(f"Another process has held {what} for over {timeout_s:.0f} s ({p}); "
                                 "wait for it to finish, or close it and retry.")
            time.sleep(POLL_S)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)

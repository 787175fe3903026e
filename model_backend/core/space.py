"""A full disk, said in one line: which folder, how much is needed, how much is free.

GDAL and OGR report a full disk as a bare RuntimeError with little or no text, and numpy or
the ONNX exporter as whatever their writer raised; so besides the errno, the free space left
in the folder decides whether a failed write was the disk being full.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from model_backend.core.errors import InputError

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
LOW_BYTES = 8 << 20
"""Below this much free space a failed write is taken for a full disk."""


def disk_full(exc: BaseException, folder: str | Path) -> bool:
    """Whether `exc`, raised while writing into `folder`, is the disk (or quota) being full."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_BYTES
    except OSError:
        return False


def no_space_error(folder: str | Path, need_bytes: int, what: str = "the results",
                   advice: str = "Free some space or choose another output folder.") -> InputError:
    """The one-line message for a full disk."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    need = max(need_bytes + LOW_BYTES, 1 << 20)
    return InputError(f"Not enough space in {folder}: {what} need about {need / 2**20:.0f} MB, "
                      f"{free / 2**20:.0f} MB are free. {advice}")


def folder_bytes(folder: str | Path) -> int:
    """Size of the files under `folder` (0 when it does not exist): what a cache costs on disk.

    Torch-free and cheap (one stat per file), so the plugin can show it on the main thread.
    """
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:  # removed meanwhile by another process
            continue
    return total

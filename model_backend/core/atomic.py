"""Atomic file writes: write beside the target, then rename.

Readers (a resumed index build, QGIS loading a layer, a second process) see the old file or the
new one, never half of one; a crash or a full disk leaves only a hidden temp file, removed here.
No torch import, so light modules (model versions, labels) can use it too.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from model_backend.core.errors import InputError


def atomic_write(path: Path, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> None:
    """Call `write` on a temp file in the target's folder, fsync it, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, f".{path.name}.", suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), suffix=".npy")


STALE_S = 3600.0
"""A hidden temp folder untouched this long was left by a killed writer (a live one keeps writing)."""


def sweep_stale(folder: Path, prefix: str, suffix: str, older_than_s: float = STALE_S) -> None:
    """Remove what killed writers left in `folder` (`prefix`*`suffix`, untouched for an hour):
    `kill -9` skips every cleanup, so the next writer of the same name cleans up instead."""
    now = time.time()
    for stale in folder.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        except OSError:  # removed meanwhile, or not ours to remove: left alone
            continue


@contextmanager
def atomic_path(path: str | os.PathLike[str], sidecars: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary path to write; on success rename it (and its sidecars) onto `path`.

    The temporary file lives in a hidden folder beside the target, so the rename stays on one
    filesystem (atomic) and whatever a driver adds next to it (journals, .aux.xml) goes away
    with the folder. A sidecar of the old target that the new file did not produce is removed:
    stale statistics in an .aux.xml would otherwise be applied to the new heatmap.
    """
    target = Path(path).absolute()
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"Output folder {folder} does not exist; create it or choose another.")
    sweep_stale(folder, f".{target.name}.", ".part")
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise InputError(f"Cannot write in {folder} ({exc.strerror}); choose another output folder.") \
            from None
    tmp = os.path.join(tmpdir, target.name)
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise OSError(f"the writer produced no file at {tmp}")
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise InputError(
                f"Cannot replace {target} ({exc.strerror}); close it in other programs or pick another name."
            ) from None
        for ext in sidecars:
            if os.path.exists(tmp + ext):
                os.replace(tmp + ext, str(target) + ext)
            elif os.path.exists(str(target) + ext):
                os.remove(str(target) + ext)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

"""What the cache holds and how to shrink it: indexes, partial builds, runtime exports, stale temp files.

Every raster, footprint and model gets its own index, and a build stopped half-way keeps its
chunks to resume; without a view of them the cache only grows. `list_cache` says what is there
(size, when last used, finished or partial); `prune_cache` removes the least recently used
finished indexes until the cache fits a size limit, partial builds and leftovers of crashed
writes older than an age, and never a folder another process is building (it holds its lock).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_backend.core.errors import InputError
from model_backend.core.locks import file_lock
from model_backend.core.paths import default_cache_dir
from model_backend.index.store import LOCK_FILE

DAY_S = 86400.0


@dataclass(frozen=True)
class CacheEntry:
    path: str
    kind: str
    """'index' (finished), 'partial' (a build that stopped; resumable), 'runtime' (a CPU export), 'temp',
    'results' (one Locate from the plugin: heatmap and matches, perhaps still in a saved project)."""
    bytes: int
    last_used: float
    """Newest modification or access time of its files (seconds since the epoch)."""
    raster: str = ""
    tiles: int = 0
    footprint_m: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_used"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used))
        return d


def _size_and_time(path: Path) -> tuple[int, float]:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size, newest = 0, path.stat().st_mtime
    for f in files:
        try:
            st = f.stat()
        except OSError:  # removed meanwhile by another process
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime, st.st_atime)
    return size, newest


def list_cache(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Everything in the cache, largest first."""
    root = Path(cache_dir or default_cache_dir())
    entries: list[CacheEntry] = []
    indexes = root / "indexes"
    for folder in sorted(indexes.iterdir()) if indexes.is_dir() else []:
        if folder.name.startswith(".") and not folder.is_dir():
            continue
        size, used = _size_and_time(folder)
        if not folder.is_dir():
            entries.append(CacheEntry(str(folder), "temp", size, used))
            continue
        manifest = folder / "manifest.json"
        try:
            doc = json.loads(manifest.read_text()) if manifest.is_file() else {}
        except (OSError, ValueError):
            doc = {}
        entries.append(CacheEntry(
            str(folder), "index" if doc else "partial", size, used,
            raster=Path(str(doc.get("raster", {}).get("path", ""))).name, tiles=int(doc.get("n_tiles", 0) or 0),
            footprint_m=float(doc.get("tiling", {}).get("footprint_m", 0.0) or 0.0)))
    results = root / "results"
    for f in sorted(results.iterdir()) if results.is_dir() else []:
        size, used = _size_and_time(f)
        entries.append(CacheEntry(str(f), "results", size, used))
    runtimes = root / "runtimes"
    for f in sorted(runtimes.iterdir()) if runtimes.is_dir() else []:
        size, used = _size_and_time(f)
        entries.append(CacheEntry(str(f), "temp" if f.name.startswith(".") else "runtime", size, used))
    return sorted(entries, key=lambda e: -e.bytes)


def prune_cache(cache_dir: str | Path | None = None, max_bytes: int | None = None,
                older_than_days: float = 7.0, dry_run: bool = False, results: bool = False,
                keep: Iterable[str | Path] = ()) -> list[CacheEntry]:
    """Remove partial builds and temp leftovers older than `older_than_days`, then the least recently
    used finished indexes until the cache is at most `max_bytes` (None: no size limit), never the most
    recently used one (the raster being worked on: rebuilding it would cost more than the limit saves)
    nor those in `keep` (every size a Locate just searched: its next photo needs them all again).
    Returns what
    was (or, with `dry_run`, would be) removed. Runtime exports stay: they are small and remade anyway.
    The plugin's results stay unless `results` (a saved project may still show them); then those
    older than `older_than_days` go too."""
    if max_bytes is not None and max_bytes < 0:
        raise InputError(f"The cache size limit must be zero or more, got {max_bytes}.")
    now = time.time()
    entries = list_cache(cache_dir)
    aged = ("partial", "temp", "results") if results else ("partial", "temp")
    doomed = [e for e in entries if e.kind in aged and now - e.last_used > older_than_days * DAY_S]
    if max_bytes is not None:
        total = sum(e.bytes for e in entries if e not in doomed)
        kept = {Path(k).resolve() for k in keep}
        for e in sorted((e for e in entries if e.kind == "index"), key=lambda e: e.last_used)[:-1]:
            if Path(e.path).resolve() in kept:
                continue
            if total <= max_bytes:
                break
            doomed.append(e)
            total -= e.bytes
    removed = []
    for e in doomed:
        if dry_run or _remove(Path(e.path)):
            removed.append(e)
    return removed


def _remove(path: Path) -> bool:
    """Delete one cache entry unless a process is building it (it holds the folder's lock)."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return True
    try:
        with file_lock(path / LOCK_FILE, timeout_s=0.0, what="this index"):
            shutil.rmtree(path, ignore_errors=True)
        return True
    except InputError:  # in use right now: kept
        return False

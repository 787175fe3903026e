"""Where things live: the user's cache and data folders, the shipped resources, a checkout's test data.

Decided once here, torch-free, so the engine, the CLI and the plugin (which shows these folders to
the analyst) can never disagree about them.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The `model_backend` folder (a checkout's, or the plugin's `libs/model_backend`)."""
CHECKOUT_ROOT = PACKAGE_DIR.parent
"""The folder holding `model_backend`: the repository root in a checkout."""


def default_cache_dir() -> Path:
    """Indexes, runtime exports and plugin results: $CDIKT_CACHE_DIR, else $XDG_CACHE_HOME/cdikt-qgis."""
    env = os.environ.get("CDIKT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdikt-qgis"


def default_data_dir() -> Path:
    """Model versions and labels of unsaved projects: $CDIKT_DATA_DIR, else $XDG_DATA_HOME/cdikt-qgis."""
    env = os.environ.get("CDIKT_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cdikt-qgis"


def runtimes_dir() -> Path:
    """Cached CPU-runtime exports (ONNX) of each model: $CDIKT_RUNTIMES_DIR, else `runtimes/` in the cache.

    The override lets several caches share one set of exports (an export takes ~8 s): the test suite
    gives each test its own cache but exports each model once."""
    env = os.environ.get("CDIKT_RUNTIMES_DIR")
    return Path(env) if env else default_cache_dir() / "runtimes"


def resources_dir() -> Path:
    """`resources/` beside `model_backend/` (a checkout), else one level up (the plugin's `libs/model_backend/`)."""
    candidates = [CHECKOUT_ROOT / "resources", CHECKOUT_ROOT.parent / "resources"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def test_data_dir() -> Path:
    """A checkout's `tests/data` (benchmarks and evaluation read it; the plugin zip has none)."""
    return CHECKOUT_ROOT / "tests" / "data"


def output_names(photos: list[str]) -> list[str]:
    """A distinct, recognisable output name per photo of one batch (outputs are <name>.heatmap.tif, ...).

    The photo's stem, unless another photo of the batch has the same stem (compared ignoring case,
    as Windows and macOS file systems do): DJI cameras restart their numbering in every flight
    folder, and `photo.jpg` may sit beside `photo.png`. Those get their folder's name and their
    extension added (`flight2_DJI_0001_JPG`), and a number if that still collides.
    """
    stems = [Path(p).stem for p in photos]
    clashes = {s.lower() for s in stems if sum(t.lower() == s.lower() for t in stems) > 1}
    names = []
    for photo, stem in zip(photos, stems):
        p = Path(photo)
        if stem.lower() in clashes:
            stem = "_".join(part for part in (p.parent.name, stem, p.suffix.lstrip(".")) if part)
        names.append(stem)
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 2
        while candidate.lower() in taken:
            candidate, n = f"{name}_{n}", n + 1
        taken.add(candidate.lower())
        unique.append(candidate)
    return unique

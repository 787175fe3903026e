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
    """Cached CPU-runtime exports (ONNX) of each model."""
    return default_cache_dir() / "runtimes"


def resources_dir() -> Path:
    """`resources/` beside `model_backend/` (a checkout), else one level up (the plugin's `libs/model_backend/`)."""
    candidates = [CHECKOUT_ROOT / "resources", CHECKOUT_ROOT.parent / "resources"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def test_data_dir() -> Path:
    """A checkout's `tests/data` (benchmarks and evaluation read it; the plugin zip has none)."""
    return CHECKOUT_ROOT / "tests" / "data"

"""Typed access to the plugin's settings, stored in QgsSettings under ``cdikt/``.

Settings live in the user's QGIS profile (never in the plugin folder, which an update or a
reinstall replaces). Every value has a typed property so the rest of the plugin never parses
QVariants or spells a key twice, and "unset" is explicit: an empty string means "use the
engine's default", so the engine, not the plugin, decides what that default is.
"""

from __future__ import annotations

import os
from pathlib import Path

from qgis.core import QgsSettings

PREFIX = "cdikt/"
PLUGIN_DIR = Path(__file__).resolve().parent


def engine_default_cache_dir() -> str:
    """The cache folder the engine uses when none is set (shown to the user; results go beside it).

    The engine decides it (model_backend.core.paths, torch-free); the engine itself is always
    called with ``cache_dir=None`` when the user set nothing.
    """
    from model_backend.core.paths import default_cache_dir

    return str(default_cache_dir())


def engine_default_data_dir() -> str:
    """Where model versions (and labels of unsaved projects) live, as the engine decides."""
    from model_backend.core.paths import default_data_dir

    return str(default_data_dir())


class CdiktSettings:
    """Typed settings over QgsSettings; pass a QgsSettings to use another store (tests)."""

    DEFAULT_FOOTPRINT_M = 60.0
    DEFAULT_TOP_K = 5
    DEFAULT_TOLERANCE_PCT = 30.0
    """QueryConfig.footprint_tolerance in percent (tests/plugin/test_settings_log.py keeps them equal)."""
    DEFAULT_CACHE_MAX_GB = 20.0

    def __init__(self, store: QgsSettings | None = None) -> None:
        self._store = store if store is not None else QgsSettings()

    # -- raw helpers -------------------------------------------------------------------------
    def _str(self, key: str) -> str | None:
        value = self._store.value(PREFIX + key, "", type=str)
        return value.strip() or None

    def _set_str(self, key: str, value: str | os.PathLike[str] | None) -> None:
        if value is None or str(value).strip() == "":
            self._store.remove(PREFIX + key)
        else:
            self._store.setValue(PREFIX + key, str(value))

    # -- paths -------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> str | None:
        """Index/result cache chosen by the user; None = the engine's default."""
        return self._str("cache_dir")

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike[str] | None) -> None:
        if value is not None and str(value).strip():
            _refuse_plugin_folder(value)
        self._set_str("cache_dir", value)

    def effective_cache_dir(self) -> str:
        """Where the cache really is: the user's choice, else the engine's default."""
        return self.cache_dir or engine_default_cache_dir()

    def results_dir(self) -> str:
        """Where heatmaps and matches are written: beside the cache, never in the plugin."""
        return str(Path(self.effective_cache_dir()) / "results")

    @property
    def weights_path(self) -> str | None:
        """A weights file the user points to; None = the engine's embedded default."""
        return self._str("weights_path")

    @weights_path.setter
    def weights_path(self, value: str | os.PathLike[str] | None) -> None:
        self._set_str("weights_path", value)

    @property
    def python_site_packages(self) -> str | None:
        """site-packages of a Python env holding torch, added to sys.path at plugin start."""
        return self._str("python_site_packages")

    @python_site_packages.setter
    def python_site_packages(self, value: str | os.PathLike[str] | None) -> None:
        self._set_str("python_site_packages", value)

    @property
    def export_dir(self) -> str | None:
        """The folder the analyst last exported candidates to (the export dialog opens there)."""
        return self._str("export_dir")

    @export_dir.setter
    def export_dir(self, value: str | os.PathLike[str] | None) -> None:
        self._set_str("export_dir", value)

    # -- query defaults ----------------------------------------------------------------------
    @property
    def default_footprint_m(self) -> float:
        value = self._store.value(PREFIX + "default_footprint_m", self.DEFAULT_FOOTPRINT_M, type=float)
        return float(value) if value and value > 0 else self.DEFAULT_FOOTPRINT_M

    @default_footprint_m.setter
    def default_footprint_m(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"Footprint must be positive, got {value}")
        self._store.setValue(PREFIX + "default_footprint_m", float(value))

    @property
    def footprint_from_exif(self) -> bool:
        """Whether the dock's "Auto" footprint box starts ticked."""
        return bool(self._store.value(PREFIX + "footprint_from_exif", True, type=bool))

    @footprint_from_exif.setter
    def footprint_from_exif(self, value: bool) -> None:
        self._store.setValue(PREFIX + "footprint_from_exif", bool(value))

    @property
    def footprint_tolerance_pct(self) -> float:
        """How far (%) a typed or EXIF footprint may be off: the sizes around it searched too (0 to 100)."""
        value = self._store.value(PREFIX + "footprint_tolerance_pct", self.DEFAULT_TOLERANCE_PCT, type=float)
        return float(value) if value is not None and 0.0 <= value <= 100.0 else self.DEFAULT_TOLERANCE_PCT

    @footprint_tolerance_pct.setter
    def footprint_tolerance_pct(self, value: float) -> None:
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"Footprint tolerance must be from 0 to 100 %, got {value}")
        self._store.setValue(PREFIX + "footprint_tolerance_pct", float(value))

    @property
    def top_k(self) -> int:
        value = self._store.value(PREFIX + "top_k", self.DEFAULT_TOP_K, type=int)
        return int(value) if value and value > 0 else self.DEFAULT_TOP_K

    @top_k.setter
    def top_k(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"top-k must be at least 1, got {value}")
        self._store.setValue(PREFIX + "top_k", int(value))

    # -- cache -------------------------------------------------------------------------------
    @property
    def cache_max_gb(self) -> float:
        """Size the cache is pruned to after each Locate (least recently used indexes first); 0 = no limit."""
        value = self._store.value(PREFIX + "cache_max_gb", self.DEFAULT_CACHE_MAX_GB, type=float)
        return float(value) if value is not None and value >= 0 else self.DEFAULT_CACHE_MAX_GB

    @cache_max_gb.setter
    def cache_max_gb(self, value: float) -> None:
        if not float(value) >= 0:
            raise ValueError(f"The cache limit must be zero (no limit) or more, got {value}")
        self._store.setValue(PREFIX + "cache_max_gb", float(value))

    def cache_max_bytes(self) -> int | None:
        gb = self.cache_max_gb
        return int(gb * 2**30) if gb > 0 else None


# -- model picker and rollback (adapted model versions) ---------------------------------------
DEFAULT_MODEL_LABEL = "Embedded default model"


def model_choices(settings: CdiktSettings) -> list[tuple[str, str | None]]:
    """(label, weights path) for the model picker: the default, every adapted version, and the
    active weights when they are a file the registry does not know (set by hand)."""
    from model_backend.learn.versions import ModelRegistry  # no torch: safe on the main thread

    choices: list[tuple[str, str | None]] = [(DEFAULT_MODEL_LABEL, None)]
    try:
        versions = ModelRegistry(engine_default_data_dir()).versions()
    except Exception:  # an unreadable registry must not break the dock; adapting reports it
        versions = []
    choices += [(v.label, v.path) for v in reversed(versions)]
    active = settings.weights_path
    if active and all(path is None or Path(path) != Path(active) for _, path in choices):
        choices.insert(1, (f"{Path(active).name} (file)", active))
    return choices


def set_active_model(settings: CdiktSettings, path: str | None) -> None:
    """Make a model the one every later locate and adaptation uses (None: the embedded default)."""
    settings.weights_path = path


def rollback_target(settings: CdiktSettings) -> tuple[bool, str | None]:
    """(possible, weights) to roll back to: the parent of the active adapted version."""
    from model_backend.learn.versions import ModelRegistry

    active = settings.weights_path
    if not active:
        return False, None
    registry = ModelRegistry(engine_default_data_dir())
    if registry.by_path(active) is None:
        return False, None
    return True, registry.parent_weights(active)


def rollback(settings: CdiktSettings) -> str | None:
    """Activate the parent of the active adapted version; returns it (None: the embedded default).

    Raises ValueError when the active model is not an adapted version (nothing to roll back to).
    """
    possible, target = rollback_target(settings)
    if not possible:
        raise ValueError("The active model is not an adapted version; there is nothing to roll back to.")
    if target and not Path(target).is_file():
        raise ValueError(f"The previous model {target} is gone; pick another in the model picker.")
    set_active_model(settings, target)
    return target


def _refuse_plugin_folder(path: str | os.PathLike[str]) -> None:
    """Refuse a cache inside the plugin folder: a plugin update would delete it."""
    p = Path(path).expanduser().resolve()
    if p == PLUGIN_DIR or PLUGIN_DIR in p.parents:
        raise ValueError(f"{p} is inside the plugin folder; choose a folder outside it for the cache.")

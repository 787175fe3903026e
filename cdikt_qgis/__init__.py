"""QGIS entry point for CDIKT drone-photo localisation.

``classFactory`` must stay cheap (QGIS calls it at start-up for every enabled plugin), so it
imports neither torch nor the engine: it only makes them findable. If anything goes wrong the
plugin still loads and shows the error in the message bar instead of a Python dialog at start-up.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import site
import sys
import traceback
from pathlib import Path


def _plugin_dirs() -> list[Path]:
    """The plugin folder as QGIS sees it and the checkout it really lives in.

    ``make install`` links the profile's plugin folder to a staging folder whose files are
    themselves links into the checkout, so only resolving this file (not its folder) finds
    the repository root and its .venv.
    """
    here = Path(__file__)
    return list(dict.fromkeys([here.absolute().parent, here.resolve().parent]))


def _ensure_engine_on_path() -> None:
    """Make ``model_backend`` importable: packaged inside the plugin, or the repo root in dev."""
    if importlib.util.find_spec("model_backend") is not None:
        return
    for plugin_dir in _plugin_dirs():
        for root in (plugin_dir, plugin_dir.parent):
            if (root / "model_backend").is_dir():
                sys.path.insert(0, str(root))
                importlib.invalidate_caches()
                return


def _site_packages_candidates() -> list[str]:
    """Where a torch-holding env may be: settings, then env var, then the repo's .venv."""
    out: list[str] = []
    from .settings import CdiktSettings  # QgsSettings only: no torch, no engine

    configured = CdiktSettings().python_site_packages
    if configured:
        out.append(configured)
    env = os.environ.get("CDIKT_SITE_PACKAGES")
    if env:
        out.extend(p for p in env.split(os.pathsep) if p)
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for plugin_dir in _plugin_dirs():
        found = sorted(glob.glob(str(plugin_dir.parent / ".venv" / "lib" / "python3.*" / "site-packages")))
        # the env built for this Python first; another minor version rarely works but is a hint
        found.sort(key=lambda p: want not in p)
        out.extend(found)
    return list(dict.fromkeys(out))


def _add_site_dir_before_system(path: str) -> None:
    """Put an env's site-packages (and its .pth entries) just before the system's site-packages.

    That is the order the env's own interpreter uses. Appended, it loses to older system copies of
    torch's pure-Python deps (Debian's sympy 1.11 vs torch's sympy>=1.13: torchvision then fails to
    import torch._dynamo). numpy is imported first so QGIS's own numpy, the one GDAL's bindings are
    built against, stays the one in use.
    """
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    before = list(sys.path)
    site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    first_site = next((i for i, p in enumerate(before)
                       if p.rstrip("/").endswith(("site-packages", "dist-packages"))), len(before))
    sys.path[:] = before[:first_site] + added + before[first_site:]
    importlib.invalidate_caches()


def _ensure_torch_on_path() -> None:
    """Add a configured env's site-packages when torch is not importable as installed."""
    if importlib.util.find_spec("torch") is not None:
        return
    for candidate in _site_packages_candidates():
        if os.path.isdir(candidate) and candidate not in sys.path:
            _add_site_dir_before_system(candidate)
            if importlib.util.find_spec("torch") is not None:
                return


class _BrokenPlugin:
    """Stands in for the plugin when start-up failed, so QGIS loads it and the user sees why."""

    def __init__(self, iface, error: str) -> None:
        self.iface = iface
        self.error = error

    def initGui(self) -> None:  # noqa: N802 (QGIS API name)
        from qgis.core import Qgis, QgsMessageLog

        QgsMessageLog.logMessage(self.error, "CDIKT", Qgis.Critical)
        if self.iface is not None:
            last = self.error.strip().splitlines()[-1] if self.error.strip() else "unknown error"
            self.iface.messageBar().pushMessage(
                "CDIKT", f"The plugin failed to start: {last} (details in the CDIKT log).", Qgis.Critical, 0
            )

    def initProcessing(self) -> None:  # noqa: N802
        pass

    def unload(self) -> None:
        pass


def classFactory(iface):  # noqa: N802 (QGIS API name)
    """Called by QGIS (iface is None under qgis_process); returns the plugin object."""
    try:
        _ensure_engine_on_path()
        _ensure_torch_on_path()
        from .plugin import CdiktPlugin

        return CdiktPlugin(iface)
    except Exception:
        return _BrokenPlugin(iface, traceback.format_exc())

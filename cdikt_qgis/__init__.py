"""QGIS entry point for CDIKT drone-photo localisation.

``classFactory`` must stay cheap (QGIS calls it at start-up for every enabled plugin), so it
imports neither torch nor the engine: it only makes them findable (bootstrap.py, which also
keeps our modules out of every other plugin's way). If anything goes wrong the plugin still
loads and shows the error in the message bar instead of a Python dialog at start-up.
"""

from __future__ import annotations

import traceback


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
        from . import bootstrap

        bootstrap.prepare()
        from .plugin import CdiktPlugin

        return CdiktPlugin(iface)
    except Exception:
        return _BrokenPlugin(iface, traceback.format_exc())

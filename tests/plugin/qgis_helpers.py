"""Test helpers shared by the plugin tests: a real-widget iface and an event-loop wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


class HeadlessIface:
    """The slice of QgisInterface the plugin calls, backed by real widgets."""

    def __init__(self) -> None:
        from qgis.core import QgsProject
        from qgis.gui import QgsLayerTreeMapCanvasBridge, QgsMapCanvas, QgsMessageBar
        from qgis.PyQt.QtWidgets import QMainWindow, QVBoxLayout, QWidget

        self._main = QMainWindow()
        self._main.resize(1200, 800)
        central = QWidget(self._main)
        layout = QVBoxLayout(central)
        self._bar = QgsMessageBar(central)
        self._canvas = QgsMapCanvas(central)
        layout.addWidget(self._bar)
        layout.addWidget(self._canvas)
        self._main.setCentralWidget(central)
        self._toolbar = self._main.addToolBar("Plugins")
        self._raster_menu = self._main.menuBar().addMenu("&Raster")
        self._bridge = QgsLayerTreeMapCanvasBridge(QgsProject.instance().layerTreeRoot(), self._canvas)
        self._active = None

    # -- QgisInterface ---------------------------------------------------------------------
    def mainWindow(self):  # noqa: N802
        return self._main

    def mapCanvas(self):  # noqa: N802
        return self._canvas

    def messageBar(self):  # noqa: N802
        return self._bar

    def activeLayer(self):  # noqa: N802
        return self._active

    def setActiveLayer(self, layer) -> None:  # noqa: N802
        self._active = layer

    def addToolBarIcon(self, action) -> None:  # noqa: N802
        self._toolbar.addAction(action)

    def removeToolBarIcon(self, action) -> None:  # noqa: N802
        self._toolbar.removeAction(action)

    def _submenu(self, name: str):
        for action in self._raster_menu.actions():
            if action.menu() is not None and action.text() == name:
                return action.menu()
        return None

    def addPluginToRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self._submenu(name) or self._raster_menu.addMenu(name)
        menu.addAction(action)

    def removePluginRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self._submenu(name)
        if menu is None:
            return
        menu.removeAction(action)
        if not menu.actions():
            self._raster_menu.removeAction(menu.menuAction())

    def addDockWidget(self, area, dock) -> None:  # noqa: N802
        self._main.addDockWidget(area, dock)

    def removeDockWidget(self, dock) -> None:  # noqa: N802
        self._main.removeDockWidget(dock)

    # -- what tests inspect ----------------------------------------------------------------
    def toolbar_actions(self) -> list:
        return list(self._toolbar.actions())

    def raster_menu_titles(self) -> list[str]:
        return [a.text() for a in self._raster_menu.actions()]

    def docks(self) -> list:
        from qgis.PyQt.QtWidgets import QDockWidget

        return self._main.findChildren(QDockWidget)

    def messages(self) -> list[tuple[str, str, int]]:
        """(title, text, level) of every message bar item, newest last."""
        return [(i.title(), i.text(), int(i.level())) for i in reversed(self._bar.items())]

    def close(self) -> None:
        self._bar.clearWidgets()
        self._main.close()
        self._main.deleteLater()


def process_events() -> None:
    from qgis.PyQt.QtCore import QCoreApplication

    QCoreApplication.processEvents()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Pump the Qt event loop (task manager signals, queued progress) until predicate() holds."""
    from qgis.PyQt.QtCore import QCoreApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QCoreApplication.processEvents()
        if predicate():
            return True
        time.sleep(0.01)
    QCoreApplication.processEvents()
    return predicate()


def naip_adapt_case(tmp_path: Path, n_photos: int = 6) -> tuple[Path, Path]:
    """A strongly shifted adaptation case: a 1.6 km crop of NAIP 2015 (the map) and `n_photos` photos
    simulated from NAIP 2020 of the same ground, labelled at their footprints. Returns (map, labels file)."""
    import rasterio
    from rasterio.windows import Window

    from model_backend.bench.adapt import make_labelled_photos

    win = Window(300, 200, 320, 320)
    paths = {}
    for year in (2015, 2020):
        with rasterio.open(DATA / f"naip_northdakota_5m_{year}.tif") as s:
            profile = {**s.profile, "width": 320, "height": 320, "transform": s.window_transform(win), "tiled": False}
            profile.pop("blockxsize", None)
            profile.pop("blockysize", None)
            paths[year] = tmp_path / f"naip_{year}.tif"
            with rasterio.open(paths[year], "w", **profile) as d:
                d.write(s.read(window=win))
    labels = make_labelled_photos(paths[2020], paths[2015], n_photos, 300.0, 3, tmp_path / "photos", size=(320, 240))
    return paths[2015], labels


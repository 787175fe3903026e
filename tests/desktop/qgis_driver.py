"""Run inside the real QGIS desktop (``qgis --code``): drive the plugin through its own widgets.

The test (test_desktop.py) starts QGIS under xvfb-run with a throw-away profile and this script;
the script clicks what a user clicks, samples what the user would see (dock status and progress,
message bar), writes everything to a JSON report and quits QGIS. The assertions live in the test,
so a crash of QGIS fails the test with the report as it stood.
"""

import json
import math
import os
import time
import traceback
from pathlib import Path

from qgis.core import QgsProject
from qgis.PyQt.QtCore import QCoreApplication, Qt, QTimer
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QAction, QApplication, QDockWidget, QFileDialog, QLineEdit
from qgis.utils import iface, plugins

CFG = json.loads(Path(os.environ["CDIKT_DESKTOP_SCENARIO"]).read_text())
OUT = Path(CFG["out"])
REPORT: dict = {"steps": [], "timeline": [], "bar": []}
T0 = time.monotonic()


def save() -> None:
    tmp = OUT / "report.json.tmp"
    tmp.write_text(json.dumps(REPORT, indent=1))
    os.replace(tmp, OUT / "report.json")


def step(name: str) -> None:
    REPORT["steps"].append({"name": name, "t": round(time.monotonic() - T0, 2)})
    save()


def dock():
    return iface.mainWindow().findChild(QDockWidget, "CdiktLocateDock")


def sample() -> None:
    """Note what changed on screen: the dock's status and progress, the message bar's items."""
    d = dock()
    if d is not None:
        now = (d.progress.value(), d.status.text())
        last = REPORT["timeline"][-1] if REPORT["timeline"] else None
        if last is None or (last["progress"], last["status"]) != now:
            REPORT["timeline"].append({"t": round(time.monotonic() - T0, 2), "progress": now[0], "status": now[1]})
    for item in iface.messageBar().items():
        entry = {"title": item.title(), "text": item.text(), "level": int(item.level())}
        if entry not in REPORT["bar"]:
            REPORT["bar"].append(entry)


def wait(condition, timeout: float, what: str) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QCoreApplication.processEvents()
        sample()
        if condition():
            return True
        time.sleep(0.05)
    REPORT.setdefault("timeouts", []).append(what)
    return False


def distance_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371008.8 * math.asin(math.sqrt(a))


def open_dock_from_toolbar():
    action = iface.mainWindow().findChild(QAction, "cdiktLocateAction")
    button = iface.pluginToolBar().widgetForAction(action) if action is not None else None
    REPORT["toolbar_button"] = button is not None
    if button is None:
        raise RuntimeError("the plugin's toolbar button is missing")
    button.click()
    wait(lambda: dock() is not None and dock().isVisible(), 10, "dock visible")
    REPORT["dock_visible"] = dock() is not None and dock().isVisible()


def pick(raster: str, photo: str):
    """Add the raster to the project and pick it and the photo in the dock, as a user does."""
    layer = iface.addRasterLayer(raster, Path(raster).stem)
    d = dock()
    d.layer_combo.setLayer(layer)
    d.photo_widget.setFilePath(photo)
    return d, plugins["cdikt_qgis"].controller


def locate(raster: str, photo: str) -> dict:
    d, controller = pick(raster, photo)
    before = controller.last_result
    t = time.monotonic()
    d.locate_button.click()
    REPORT["locate_enabled_while_running"] = d.locate_button.isEnabled()
    wait(lambda: controller.task is None and not d.cancel_button.isEnabled(), CFG.get("locate_timeout", 150),
         "locate finished")
    result = controller.last_result
    out = {"seconds": round(time.monotonic() - t, 1), "status": d.status.text(), "new_result": result is not before,
           "started_at": round(t - T0, 2), "ended_at": round(time.monotonic() - T0, 2),
           "footprint_used": d.footprint_used.text(), "table_rows": d.candidates_table.rowCount()}
    if result is not None and result is not before and result.candidates:
        best = result.candidates[0]
        truth = json.loads(Path(CFG["truth"]).read_text())
        out.update(lon=best.lon, lat=best.lat, score=best.score, verified=bool(getattr(best, "verified", False)),
                   candidates=len(result.candidates),
                   error_m=distance_m(best.lon, best.lat, *truth["centre_lonlat"]),
                   footprint_shown=d.footprint_spin.value())
    return out


def export(path: Path) -> dict:
    seen: dict = {}

    def answer() -> None:
        dlg = QApplication.activeModalWidget()
        if not isinstance(dlg, QFileDialog):
            if not seen and time.monotonic() < deadline:
                QTimer.singleShot(200, answer)
            return
        seen["directory"] = dlg.directory().absolutePath()
        seen["suggested"] = (dlg.selectedFiles() or [""])[0]
        name = dlg.findChild(QLineEdit, "fileNameEdit")  # type the name and press Enter, as a user does
        name.setText(str(path))
        QTest.keyClick(name, Qt.Key_Return)

    deadline = time.monotonic() + 10
    QTimer.singleShot(200, answer)
    dock().export_button.click()  # opens the save dialog; `answer` fills it in from inside its event loop
    wait(lambda: path.exists(), 10, "export written")
    seen["written"] = path.exists()
    return seen


def cancel_during_index(raster: str, photo: str) -> dict:
    d, controller = pick(raster, photo)
    d.locate_button.click()
    wait(lambda: "Embedding tiles" in d.status.text(), 90, "index build started")
    status_when_cancelled = d.status.text()
    d.cancel_button.click()
    wait(lambda: controller.task is None and "ancel" in d.status.text() and "ancelling" not in d.status.text(),
         60, "cancel finished")
    wait(lambda: False, 1.0, "settle")  # let QGIS post its own notifications about the task
    return {"status_when_cancelled": status_when_cancelled, "status": d.status.text()}


def main() -> None:
    from qgis.core import QgsApplication

    REPORT["plugins"] = sorted(plugins)
    REPORT["providers"] = sorted(p.id() for p in QgsApplication.processingRegistry().providers())
    import importlib.util

    spec = importlib.util.find_spec("processing")
    REPORT["processing_origin"] = spec.origin if spec else None
    step("started")
    if "cdikt_qgis" not in plugins:
        raise RuntimeError("the plugin did not load")
    open_dock_from_toolbar()
    step("dock opened")
    REPORT["locate"] = locate(CFG["raster"], CFG["photo"])
    step("located")
    canvas = iface.mapCanvas()  # the map as the analyst sees it: wait for the result layers to be drawn
    canvas.refresh()
    wait(lambda: not canvas.isDrawing(), 1.0, "canvas started")
    wait(lambda: not canvas.isDrawing(), 20, "canvas drawn")
    dock().grab().save(str(OUT / "dock.png"))
    iface.mainWindow().grab().save(str(OUT / "window.png"))
    if CFG.get("export"):
        REPORT["export"] = export(OUT / "exported.geojson")
        step("exported")
    if CFG.get("cancel_raster"):
        REPORT["cancel"] = cancel_during_index(CFG["cancel_raster"], CFG["photo"])
        step("cancelled")


try:
    main()
    REPORT["done"] = True
except Exception:
    REPORT["error"] = traceback.format_exc()
finally:
    sample()
    layers = QgsProject.instance().mapLayers().values()
    REPORT["layers"] = sorted(f"{lyr.name()} [{lyr.providerType()}]" for lyr in layers)
    save()
    # results under /tmp count as "temporary layers" for QGIS, which would ask before closing
    QgsProject.instance().clear()
    QTimer.singleShot(0, iface.actionExit().trigger)

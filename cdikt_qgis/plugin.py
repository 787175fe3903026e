"""The plugin object QGIS talks to, and the controller between the dock and the engine.

The constructor does not touch ``iface`` (qgis_process passes None and only calls
``initProcessing``); GUI objects are made in ``initGui`` and every one of them is removed in
``unload``, which also cancels running work so a reload never leaves a task writing files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsProject
from qgis.PyQt.QtCore import QObject, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from model_backend.core.requests import Failure, Status  # torch-free

from .icons import icon_path
from .layers import add_flight_layers, add_result_layers, export_candidates
from .log import install as install_log
from .log import uninstall as uninstall_log
from .notify import Notifier
from .settings import CdiktSettings
from .tasks import (
    FlightTask,
    LayerError,
    LocateParams,
    LocateTask,
    capture_raster,
    flight_request,
    locate_request,
    tidy_cache,
)

logger = logging.getLogger(__name__)
MENU = "&CDIKT"
TITLE = "CDIKT"


class LocateController(QObject):
    """Runs one locate at a time: a new request cancels the stale one, whose result is ignored."""

    def __init__(self, iface, dock, settings: CdiktSettings | None = None) -> None:
        super().__init__(dock)
        self.iface = iface
        self.dock = dock
        self.settings = settings or CdiktSettings()
        self.request = 0
        self.task: LocateTask | None = None
        self.last_result = None
        self._closed = False
        self.notifier = Notifier(iface, TITLE)
        dock.locate_requested.connect(self.locate)
        dock.flight_requested.connect(self.locate_flight)
        dock.cancel_requested.connect(self.cancel)
        dock.export_requested.connect(self.export)
        dock.set_cache_text(tidy_cache(self.settings.cache_dir, None).text(self.settings.cache_max_bytes()))

    # -- messages ------------------------------------------------------------------------------
    def _push(self, text: str, level: Qgis.MessageLevel, duration: int = 8) -> None:
        self.notifier.push(text, level, duration)

    # -- actions -------------------------------------------------------------------------------
    def locate(self, params: LocateParams) -> LocateTask | None:
        """Validate on the main thread, capture the layer, and queue a LocateTask.

        The dock's Locate button is disabled while a task runs; a script calling this directly
        supersedes the running request (its result is then ignored).
        """
        if self._closed:
            return None
        self.notifier.clear()  # messages about the previous request are stale now
        source = self._source(params)
        if source is None:
            return None
        photo = params.photo
        if not photo:
            msg = "Pick the drone photo to locate."
        elif not os.path.isfile(photo):
            msg = f"Photo not found: {photo}"
        else:
            msg = ""
        if msg:
            return self._refuse(msg)

        self._remember(params)
        self.cancel()  # the stale request, if any; its result will be ignored
        self.request += 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = str(Path(self.settings.results_dir()) / f"{Path(photo).stem}-{stamp}-{self.request}")
        task = LocateTask(self.request, locate_request(params, source, out_dir, self.settings), self._finished,
                          cache_max_bytes=self.settings.cache_max_bytes())
        self.dock.set_result_available(self.last_result is not None)
        logger.info("Request %d: locating %s in %s", self.request, photo, source.path)
        return self._queue(task)

    def _source(self, params: LocateParams):
        """The raster captured on the main thread, or None after saying why it cannot be used."""
        try:
            return capture_raster(params.layer)
        except LayerError as exc:
            self._refuse(str(exc))
            return None

    def _refuse(self, msg: str) -> None:
        self.dock.set_status(msg)
        self._push(msg, Qgis.Warning)

    def _queue(self, task):
        task.progressed.connect(self._progress)
        self.task = task
        self.dock.set_running(True)
        QgsApplication.taskManager().addTask(task)
        return task

    def locate_flight(self, params: LocateParams) -> FlightTask | None:
        """Queue a FlightTask for the flight folder in `params.photo`. Its outputs go to a folder named after
        the flight and the raster, so running it again resumes (photos already located are reused)."""
        if self._closed:
            return None
        self.notifier.clear()
        source = self._source(params)
        if source is None:
            return None
        folder = params.photo
        if not folder or not os.path.isdir(folder):
            return self._refuse("Pick the flight's folder of photos (Flight)." if not folder
                                else f"Flight folder not found: {folder}")
        self._remember(params)
        self.cancel()
        self.request += 1
        key = hashlib.sha256(f"{Path(folder).resolve()}|{source.path}".encode()).hexdigest()[:8]
        out_dir = str(Path(self.settings.results_dir()) / f"flight-{Path(folder).name}-{key}")
        task = FlightTask(self.request, flight_request(params, source, out_dir, self.settings), self._finished,
                          cache_max_bytes=self.settings.cache_max_bytes())
        logger.info("Request %d: locating the flight %s in %s", self.request, folder, source.path)
        return self._queue(task)

    def _remember(self, params: LocateParams) -> None:
        """The dock opens with the last footprint / top-k used: analysts work in series of photos."""
        self.settings.default_footprint_m = params.footprint_m
        self.settings.footprint_from_exif = params.footprint_auto
        self.settings.footprint_tolerance_pct = params.tolerance_pct
        self.settings.top_k = params.top_k

    def cancel(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            _disconnect(task, self._progress)
            task.cancel()
            self.dock.set_running(False)
            self.dock.set_status("Cancelling…")

    def export(self, path: str) -> str | None:
        if self.last_result is None:
            self._push("Nothing to export yet: run Locate first.", Qgis.Info)
            return None
        try:
            written = export_candidates(self.last_result, path)
        except (OSError, ValueError) as exc:
            self._push(f"Export failed: {exc}", Qgis.Warning)
            return None
        self._push(f"Candidates exported to {written}", Qgis.Success, 5)
        return written

    def shutdown(self) -> None:
        """Cancel work and stop reacting to it (plugin unload)."""
        self._closed = True
        task, self.task = self.task, None
        if task is not None:
            task.on_done = None
            _disconnect(task, self._progress)
            task.cancel()

    # -- task callbacks (main thread) ----------------------------------------------------------
    def _progress(self, fraction: float, message: str) -> None:
        if self.task is not None and not self._closed:
            self.dock.set_progress(fraction, message)

    def _finished(self, task: LocateTask) -> None:
        if self._closed:
            return
        if task.request_id != self.request:  # superseded: a newer request owns the dock now
            logger.info("Ignoring the outcome (%s) of stale request %d", task.outcome.status.value, task.request_id)
            return
        self.task = None
        self.dock.set_running(False)
        outcome = task.outcome
        if outcome.succeeded and isinstance(task, FlightTask):
            self._show_flight(task)
        elif outcome.succeeded:
            self._show(task)
        elif outcome.status is Status.CANCELLED:
            self.dock.set_progress(0.0)
            self.dock.set_status("Cancelled")
        elif outcome.failure is Failure.INPUT:
            self.dock.set_status(outcome.message)
            self._push(outcome.message, Qgis.Warning)
        elif outcome.failure is Failure.MISSING_DEPENDENCY:
            self.dock.set_status("PyTorch is missing; see the message bar.")
            self._push(outcome.message, Qgis.Critical, 0)
            self.notifier.details(outcome.details)
        else:
            self.dock.set_status(f"Failed: {outcome.message}")
            text = f"Unexpected error: {outcome.message} (full traceback in the CDIKT log)."
            self._push(text, Qgis.Critical, 0)
            self.notifier.details(outcome.details or outcome.message)

    def _show_flight(self, task: FlightTask) -> None:
        result = task.result
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        try:
            add_flight_layers(result, QgsProject.instance(), canvas)
        except ValueError as exc:
            self.dock.set_status(str(exc))
            self._push(str(exc), Qgis.Critical)
            return
        self.dock.set_cache_text(task.cache.text(self.settings.cache_max_bytes()))
        self.dock.set_progress(1.0)
        flags = [line["flag"] for line in result.lines]
        text = (f"Flight: {len(result.lines)} photos as one track (ordered by {result.order_source}); "
                f"{flags.count('outlier')} outlier, {flags.count('uncertain')} uncertain"
                + (f", {len(result.failed)} could not be read" if result.failed else "")
                + (f", {result.reused} reused" if result.reused else "") + f"; {task.message}. "
                f"Table: {result.csv_path}")
        self.dock.set_status(text)
        if result.failed:
            self._push(f"{len(result.failed)} photos of the flight could not be located; the first: "
                       f"{result.failed[0]}", Qgis.Warning)

    def _show(self, task: LocateTask) -> None:
        result = task.result
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        try:
            add_result_layers(result, QgsProject.instance(), canvas)
        except ValueError as exc:
            self.dock.set_status(str(exc))
            self._push(str(exc), Qgis.Critical)
            return
        self.last_result = result
        self.dock.show_result(result)
        self.dock.set_cache_text(task.cache.text(self.settings.cache_max_bytes()))
        self.dock.set_result_available(True)
        self.dock.set_progress(1.0)
        best = result.candidates[0] if result.candidates else None
        where = (f"best at lat {best.lat:.6f}, lon {best.lon:.6f} (score {best.score:.3f})"
                 if best else "no candidate")
        if best is not None and getattr(best, "verified", None):
            where += (f"; footprint verified ({best.inliers} inliers, confidence {best.confidence:.2f}, "
                      f"heading {best.heading_deg:.0f}°, {100 * best.gsd_m:.1f} cm/px)")
        elif best is not None and getattr(best, "verified", None) is False:
            where += "; not verified: showing the best tile"
        used = f"footprint {result.footprint_note()}" if result.footprint_m else ""
        self.dock.set_status(f"{len(result.candidates)} candidates, {where}; {used}; {task.message}.")
        gps = getattr(result, "extra", {}) or {}
        if gps.get("gps_disagrees"):
            self._push(f"The best match is {gps.get('gps_distance_m', 0):.0f} m from the photo's GPS position; "
                       "check the candidates or search near the GPS.", Qgis.Warning)


def _disconnect(task: LocateTask, slot) -> None:
    """Stop a stale task's progress from reaching the dock (it may still report while winding down)."""
    try:
        task.progressed.disconnect(slot)
    except (TypeError, RuntimeError):
        pass


class CdiktPlugin:
    """QGIS plugin object: toolbar button + Raster menu entry showing the Locate dock."""

    def __init__(self, iface) -> None:
        self.iface = iface  # may be None under qgis_process; do not touch it here
        self.settings = CdiktSettings()
        self.action: QAction | None = None
        self.dock = None
        self.controller: LocateController | None = None
        self.labelling = None  # labelling.LabellingController, with the dock
        self.adapt_controller = None  # adapt_task.AdaptController, with the dock
        self.provider = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API)
        """Register the CDIKT Processing provider (toolbox, batch, modeler, qgis_process).

        QGIS calls this for plugins with hasProcessingProvider=yes and initGui calls it too, so it
        must stay idempotent; ``unload`` removes whatever sits in ``self.provider``. The registry
        refuses a second provider with the same id (and owns what it is given), so only an accepted
        provider is kept: unload must never remove another instance's provider.
        """
        install_log()
        if self.provider is not None:
            return
        from .processing import CdiktProvider

        provider = CdiktProvider()
        if QgsApplication.processingRegistry().addProvider(provider):
            self.provider = provider
        else:
            logger.warning("A Processing provider with id 'cdikt' is already registered; not adding another.")

    def initGui(self) -> None:  # noqa: N802 (QGIS API)
        install_log()
        self.initProcessing()
        path = icon_path()
        icon = QIcon(path) if path else QgsApplication.getThemeIcon("/mActionZoomToArea.svg")
        self.action = QAction(icon, "Locate drone image", self.iface.mainWindow())
        self.action.setObjectName("cdiktLocateAction")
        self.action.setToolTip("Locate drone image: find where a drone photo was taken on a raster")
        self.action.triggered.connect(self.show_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)

    def show_dock(self) -> None:
        """Create the dock on first use (keeps QGIS start-up cheap), then show it."""
        from .dock import LocateDock

        if self.dock is None:
            self.dock = LocateDock(self.settings, self.iface.mainWindow())
            self.controller = LocateController(self.iface, self.dock, self.settings)
            self._wire_model_panel()
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.set_layer(self.iface.activeLayer())
        self.dock.show()
        self.dock.raise_()

    def _wire_model_panel(self) -> None:
        """Label pairs…, This candidate is right, Adapt model, model picker and Roll back (dock's Model section)."""
        from .adapt_task import AdaptController
        from .labelling import LabellingController

        panel = self.dock.model_panel
        self.labelling = LabellingController(self.iface, self.settings, raster=self.dock.layer_combo.currentLayer,
                                             last_result=lambda: self.controller.last_result if self.controller
                                             else None)
        panel.label_pairs_requested.connect(self.labelling.open_dialog)
        # the candidate selected in the dock's table, not only #1: a label matters most when #1 is wrong
        panel.accept_candidate_requested.connect(lambda: self.labelling.accept(self.dock.selected_rank()))
        self.adapt_controller = AdaptController(self.iface, panel, self.settings,
                                                raster=self.dock.layer_combo.currentLayer,
                                                labels_path=self.labelling.labels_path)

    def unload(self) -> None:
        for part in (self.adapt_controller, self.labelling):
            if part is not None:
                part.shutdown()
        self.adapt_controller = self.labelling = None
        if self.controller is not None:
            self.controller.shutdown()
            self.controller = None
        if self.dock is not None:
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.setParent(None)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        uninstall_log()

"""Adapt model from QGIS: a QgsTask around `model_backend.adapt`, and the dock's model controls.

The task writes the new model under the user data folder and records it in the model registry;
only `finished()`, on the main thread and after a successful run, makes it the active model — and
only when its validation figure is at least as good as the current model's. So a cancelled,
failed or worse adaptation leaves the active model exactly as it was. As for locating, nothing in
``run()`` touches a layer: the raster is captured on the main thread first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import QObject

from .engine_task import EngineTask
from .settings import CdiktSettings, engine_default_data_dir, model_choices, rollback, set_active_model
from .tasks import LayerError, RasterSource, capture_raster

log = logging.getLogger(__name__)
TITLE = "CDIKT"
CPU_NOTE = "On CPU only the network's last stage is adapted (a few minutes); the rest stays as it was."


@dataclass(frozen=True)
class AdaptParams:
    """Plain values for the worker thread."""

    raster: RasterSource
    labels: str
    weights: str | None
    out: str
    data_dir: str
    cache_dir: str | None = None
    epochs: int | None = None


class AdaptTask(EngineTask):
    """Run one adaptation (see EngineTask); ``result`` is the engine's AdaptResult."""

    cancelled_message = "Adaptation cancelled; the active model is unchanged."
    late_cancel_discards = False

    def __init__(self, params: AdaptParams, on_done: Callable[[AdaptTask], None] | None = None) -> None:
        super().__init__(f"CDIKT: adapting the model to {params.raster.name}", on_done)
        self.params = params

    def work(self) -> Any:
        from model_backend.adapt import AdaptConfig, adapt
        from model_backend.model_versions import ModelRegistry

        p = self.params
        config = AdaptConfig() if p.epochs is None else AdaptConfig(epochs=p.epochs)
        return adapt(p.raster.path, p.labels, p.out, p.weights, config=config, cache_dir=p.cache_dir,
                     registry=ModelRegistry(p.data_dir), progress=self._progress, cancel=self.isCanceled)


class AdaptController(QObject):
    """Connects the dock's ModelPanel to adaptation, the model picker and rollback."""

    def __init__(self, iface, panel, settings: CdiktSettings | None = None,
                 raster: Callable[[], Any] | None = None, labels_path: Callable[[], Path] | None = None) -> None:
        super().__init__(panel)
        self.iface = iface
        self.panel = panel
        self.settings = settings or CdiktSettings()
        self.raster = raster or (lambda: None)
        self.labels_path = labels_path
        self.task: AdaptTask | None = None
        self._closed = False
        panel.adapt_requested.connect(self.adapt)
        panel.cancel_adapt_requested.connect(self.cancel)
        panel.rollback_requested.connect(self.rollback)
        panel.model_chosen.connect(self.choose)
        self.refresh_models()
        panel.set_status(CPU_NOTE)

    def _push(self, text: str, level: Qgis.MessageLevel = Qgis.Warning, duration: int = 10) -> None:
        if self.iface is not None:
            self.iface.messageBar().pushMessage(TITLE, text, level, duration)
        QgsMessageLog.logMessage(text, TITLE, level)

    def refresh_models(self) -> None:
        self.panel.set_models(model_choices(self.settings), self.settings.weights_path)

    def choose(self, path: str | None) -> None:
        set_active_model(self.settings, path)
        self.panel.set_status(f"Active model: {Path(path).name if path else 'embedded default'}.")

    def rollback(self) -> str | None:
        try:
            target = rollback(self.settings)
        except ValueError as exc:
            self._push(str(exc), Qgis.Info)
            return None
        self.refresh_models()
        text = f"Rolled back to {Path(target).name if target else 'the embedded default model'}."
        self.panel.set_status(text)
        self._push(text, Qgis.Success, 5)
        return target

    def adapt(self) -> AdaptTask | None:
        if self._closed or self.task is not None:
            return None
        try:
            source = capture_raster(self.raster())
        except LayerError as exc:
            self._push(str(exc))
            return None
        labels = Path(self.labels_path()) if self.labels_path else None
        if labels is None or not labels.is_file():
            self._push("No labelled pairs yet: use Label pairs… (or This candidate is right) first.")
            return None
        from model_backend.model_versions import ModelRegistry

        data_dir = engine_default_data_dir()
        out = ModelRegistry(data_dir).new_path()
        params = AdaptParams(source, str(labels), self.settings.weights_path, str(out), data_dir,
                             self.settings.cache_dir)
        task = AdaptTask(params, on_done=self._finished)
        task.progressed.connect(self.panel.set_progress)
        self.task = task
        self.panel.set_running(True)
        self.panel.set_status("Adapting… " + CPU_NOTE)
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.panel.set_status("Cancelling…")

    def _finished(self, task: AdaptTask) -> None:
        self.task = None
        if self._closed:
            return
        self.panel.set_running(False)
        if task.outcome == AdaptTask.OK:
            res = task.result
            before, after = res.before, res.after
            figure = (f"top-1 {100 * before.top1:.0f} % → {100 * after.top1:.0f} %, median rank "
                      f"{before.median_rank:g} → {after.median_rank:g} on {after.n} held-out photos")
            if after.better_or_equal(before):
                set_active_model(self.settings, res.out)
                text = f"Adapted model is now active ({figure}; trained: {res.trained_part})."
                level = Qgis.Success
            else:
                text = (f"The adapted model is not better ({figure}); the current model stays active. "
                        "Pick the new version in the model picker to use it anyway.")
                level = Qgis.Warning
            self.refresh_models()
            self.panel.set_status(text)
            self._push(text, level, 0)
        elif task.outcome == AdaptTask.CANCELLED:
            self.panel.set_status("Adaptation cancelled; the active model is unchanged.")
        else:
            self.panel.set_status(task.message)
            self._push(task.message, Qgis.Critical if task.outcome == AdaptTask.BUG else Qgis.Warning, 0)
            if task.details:
                QgsMessageLog.logMessage(task.details, TITLE, Qgis.Critical)

    def shutdown(self) -> None:
        self._closed = True
        task, self.task = self.task, None
        if task is not None:
            task.on_done = None
            task.cancel()

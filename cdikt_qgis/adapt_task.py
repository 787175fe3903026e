"""Adapt model from QGIS: a QgsTask around `model_backend.learn.adapt`, and the dock's model controls.

The task writes the new model under the user data folder and records it in the model registry;
only `finished()`, on the main thread and after a successful run, makes it the active model — and
only when its validation figure is at least as good as the current model's. So a cancelled,
failed or worse adaptation leaves the active model exactly as it was. As for locating, nothing in
``run()`` touches a layer: the raster is captured on the main thread first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import QObject
from qgis.PyQt.QtWidgets import QMessageBox

from model_backend.core.config import ModelConfig  # torch-free
from model_backend.core.errors import CdiktError  # torch-free
from model_backend.core.requests import AdaptRequest, Failure, Status

from .engine_task import EngineTask
from .notify import Notifier
from .settings import (
    CdiktSettings,
    engine_default_data_dir,
    model_choices,
    rollback,
    rollback_target,
    set_active_model,
)
from .tasks import LayerError, RasterSource, capture_raster

log = logging.getLogger(__name__)
TITLE = "CDIKT"
CPU_NOTE = "On CPU only the network's last stage is adapted (a few minutes); the rest stays as it was."
MIN_PAIRS = 2
RECOMMENDED_PAIRS = 10
"""Adaptation needs 2 labelled pairs (one to train, one to check); the measured gains used 10 (docs/adapt.md)."""


def count_pairs(labels: Path) -> int:
    """Labelled pairs in the labels file (torch-free: the engine's label reader)."""
    from model_backend.learn.labels import read_labels

    return len(read_labels(labels).labels)


def ask_to_adapt_with_few_pairs(parent, n: int) -> bool:
    """The analyst decides whether a few pairs are worth a few minutes of adapting."""
    answer = QMessageBox.question(
        parent, "Adapt model",
        f"There are {n} labelled pairs. {RECOMMENDED_PAIRS} or more are recommended: with fewer, the held-out "
        f"check is noisy and the adapted model may not be better.\n\nAdapt with these {n} pairs anyway?",
        QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def adapt_request(source: RasterSource, labels: Path, out: Path, data_dir: str, settings: CdiktSettings,
                  epochs: int | None = None) -> AdaptRequest:
    """The engine's AdaptRequest for the dock: the same request the CLI and Processing build, learning from
    the rest of the flight (the other photos in the labelled photos' folders) as Processing does by default."""
    return AdaptRequest(source.path, str(labels), str(out), ModelConfig(weights=settings.weights_path),
                        cache_dir=settings.cache_dir, epochs=epochs, data_dir=data_dir, flight_photos=True)


class AdaptTask(EngineTask):
    """Run one AdaptRequest (see EngineTask); ``result`` is the engine's AdaptResult."""

    cancelled_message = "Adaptation cancelled; the active model is unchanged."
    late_cancel_discards = False

    def __init__(self, request: AdaptRequest, raster_name: str,
                 on_done: Callable[[AdaptTask], None] | None = None) -> None:
        super().__init__(f"CDIKT: adapting the model to {raster_name}", on_done)
        self.request = request

    def work(self) -> Any:
        from model_backend.learn.adapt import adapt_model

        return adapt_model(self.request, progress=self._progress, cancel=self.isCanceled)


class AdaptController(QObject):
    """Connects the dock's ModelPanel to adaptation, the model picker and rollback."""

    def __init__(self, iface, panel, settings: CdiktSettings | None = None,
                 raster: Callable[[], Any] | None = None, labels_path: Callable[[], Path] | None = None,
                 confirm_few_pairs: Callable[[int], bool] | None = None) -> None:
        super().__init__(panel)
        self.iface = iface
        self.panel = panel
        self.settings = settings or CdiktSettings()
        self.raster = raster or (lambda: None)
        self.labels_path = labels_path
        self.confirm_few_pairs = confirm_few_pairs or (lambda n: ask_to_adapt_with_few_pairs(panel, n))
        self.task: AdaptTask | None = None
        self._closed = False
        self.notifier = Notifier(iface, TITLE)
        panel.adapt_requested.connect(self.adapt)
        panel.cancel_adapt_requested.connect(self.cancel)
        panel.rollback_requested.connect(self.rollback)
        panel.model_chosen.connect(self.choose)
        self.refresh_models()
        panel.set_status(CPU_NOTE)

    def _push(self, text: str, level: Qgis.MessageLevel = Qgis.Warning, duration: int = 10) -> None:
        self.notifier.push(text, level, duration)

    def refresh_models(self) -> None:
        self.panel.set_models(model_choices(self.settings), self.settings.weights_path)
        self._update_rollback()

    def _update_rollback(self) -> None:
        """Roll back only when the active model is an adapted version (the embedded default has no parent)."""
        try:
            possible = rollback_target(self.settings)[0]
        except (OSError, ValueError, CdiktError) as exc:  # an unreadable registry: the button stays off
            log.warning("Model registry unreadable, Roll back disabled: %s", exc)
            possible = False
        self.panel.rollback_button.setEnabled(possible and self.task is None)

    def choose(self, path: str | None) -> None:
        """Make the picked model active, unless it is a recorded version whose file has changed."""
        from model_backend.learn.versions import ModelRegistry  # torch-free

        try:
            ModelRegistry(engine_default_data_dir()).check(path)
        except CdiktError as exc:
            self._push(str(exc))
            self.refresh_models()  # the picker shows the model that stays active
            return
        set_active_model(self.settings, path)
        self._update_rollback()
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
        try:
            n = count_pairs(labels)
        except (OSError, ValueError) as exc:
            self._push(f"The labelled pairs cannot be read: {exc}")
            return None
        if n < MIN_PAIRS:
            self._push(f"{n} labelled pair{'s' if n != 1 else ''}: adapting needs at least {MIN_PAIRS} "
                       f"({RECOMMENDED_PAIRS} or more recommended); label more with Label pairs….")
            return None
        if n < RECOMMENDED_PAIRS and not self.confirm_few_pairs(n):
            self.panel.set_status(f"Not adapted: {n} labelled pairs; {RECOMMENDED_PAIRS} or more are recommended.")
            return None
        from model_backend.learn.versions import ModelRegistry

        data_dir = engine_default_data_dir()
        out = ModelRegistry(data_dir).new_path()
        task = AdaptTask(adapt_request(source, labels, out, data_dir, self.settings), source.name,
                         on_done=self._finished)
        task.progressed.connect(self.panel.set_progress)
        self.task = task
        self.panel.set_running(True)
        self.panel.set_status(f"Adapting on {n} labelled pairs… " + CPU_NOTE)
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
        self._update_rollback()
        if task.outcome.succeeded:
            res = task.result
            before, after = res.before, res.after
            figure = (f"top-1 {100 * before.top1:.0f} % → {100 * after.top1:.0f} %, median rank "
                      f"{before.median_rank:g} → {after.median_rank:g} on {after.n} labelled photos, each "
                      "checked by a model that did not train on it")
            pseudo = getattr(res, "pseudo", None)
            if pseudo is not None and pseudo.tried:
                figure += f"; {len(pseudo.labels)} of {pseudo.tried} other photos of the flight trained as extra pairs"
            if res.use:  # the engine's keep-or-reject decision (learn.adapt.crossfit), never a guess here
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
        elif task.outcome.status is Status.CANCELLED:
            self.panel.set_status("Adaptation cancelled; the active model is unchanged.")
        else:
            self.panel.set_status(task.message)
            self._push(task.message, Qgis.Warning if task.outcome.failure is Failure.INPUT else Qgis.Critical, 0)
            if task.details:
                self.notifier.details(task.details)

    def shutdown(self) -> None:
        self._closed = True
        task, self.task = self.task, None
        if task is not None:
            task.on_done = None
            task.cancel()

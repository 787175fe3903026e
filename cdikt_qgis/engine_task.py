"""What every background job of the plugin shares: a QgsTask that runs one engine call, safely.

Locating and adapting differ only in the engine call they make; how a job reports progress,
turns the engine's errors into one line for the analyst (cancelled, the user's input, PyTorch
missing, a bug with its traceback for the log), and hands its outcome to the main thread is the
same, so it lives here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from model_backend.core.errors import MissingDependency  # torch-free, as requests
from model_backend.core.requests import Outcome, Status

log = logging.getLogger(__name__)

LIVE_TASKS: set[EngineTask] = set()
"""Python references to tasks until they finish: a task collected while running crashes QGIS,
and unload() must be able to drop its own references while a cancelled task winds down."""

TORCH_PACKAGES = ("torch", "torchvision", "timm")


class EngineTask(QgsTask):
    """A cancellable task around one engine call (`work`), which must not touch layers or widgets.

    ``on_done(task)`` is called from ``finished()`` on the main thread; it reads ``outcome``, the
    engine's typed `Outcome` (succeeded with ``result``, cancelled, or failed with one line for the
    analyst and, for a bug, a traceback for the log). ``progressed`` carries the engine's fraction
    and short message; connect it to a QObject's method so Qt queues it to the main thread.
    """

    progressed = pyqtSignal(float, str)

    cancelled_message = "Cancelled."
    late_cancel_discards = True
    """A cancel that comes after the engine's last check: discard the result (it is stale for the
    user) or keep it (it was already written and recorded, as an adapted model is)."""

    def __init__(self, description: str, on_done: Callable[[Any], None] | None = None) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.on_done = on_done
        self.outcome: Outcome[Any] | None = None
        self.status_text = "Queued"
        LIVE_TASKS.add(self)

    @property
    def result(self) -> Any:
        return self.outcome.value if self.outcome is not None else None

    @property
    def message(self) -> str:
        """One line for the analyst: the failure or cancellation, or `done_message` on success."""
        if self.outcome is None:
            return ""
        return self.done_message() if self.outcome.succeeded else self.outcome.message

    @property
    def details(self) -> str:
        return self.outcome.details if self.outcome is not None else ""

    def work(self) -> Any:
        """The engine call, on the worker thread; raises the engine's errors. Returns the result."""
        raise NotImplementedError

    def done_message(self) -> str:
        """The one line for a successful run."""
        return "Done."

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> Any:
        """`work`, with a missing PyTorch turned into install advice instead of a traceback."""
        try:
            return self.work()
        except ImportError as exc:
            if (getattr(exc, "name", "") or "").split(".")[0] in TORCH_PACKAGES:
                raise MissingDependency(f"{NO_TORCH_ADVICE} ({exc})") from exc
            raise

    def _progress(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.status_text = message
        self.setProgress(100.0 * fraction)
        self.progressed.emit(fraction, message)

    def run(self) -> bool:
        self.outcome = Outcome.of(self._work, self.cancelled_message)
        if self.outcome.succeeded and self.late_cancel_discards and self.isCanceled():
            self.outcome = Outcome.cancelled(self.cancelled_message)
        if self.outcome.status is Status.CANCELLED:
            # A cancel the user asked for is a clean end, not a failure: returning False would make
            # QGIS announce "Task failed" (it does for any terminated task that ran a few seconds
            # while its window was not in front). The description says it was cancelled instead.
            self.setDescription(f"{self.description()} (cancelled)")
            return True
        return self.outcome.succeeded

    # -- main thread ---------------------------------------------------------------------------
    def finished(self, ok: bool) -> None:  # noqa: D401 (QGIS API)
        try:
            if self.outcome is None:  # cancelled before run() started, or terminated by the task manager
                self.outcome = Outcome.cancelled(self.cancelled_message)
            if self.on_done is not None:
                self.on_done(self)
        except Exception:
            log.exception("Error while handling the end of %s", self.description())
        finally:
            self.on_done = None
            LIVE_TASKS.discard(self)


NO_TORCH_ADVICE = (
    "PyTorch is not available to QGIS's Python. Install it with `make setup`, or `pip install torch` into the "
    "Python env whose site-packages is set in the cdikt/python_site_packages setting (or CDIKT_SITE_PACKAGES), "
    "then restart QGIS."
)

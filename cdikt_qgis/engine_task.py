"""What every background job of the plugin shares: a QgsTask that runs one engine call, safely.

Locating and adapting differ only in the engine call they make; how a job reports progress,
turns the engine's errors into one line for the analyst (cancelled, the user's input, PyTorch
missing, a bug with its traceback for the log), and hands its outcome to the main thread is the
same, so it lives here once.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

log = logging.getLogger(__name__)

LIVE_TASKS: set[EngineTask] = set()
"""Python references to tasks until they finish: a task collected while running crashes QGIS,
and unload() must be able to drop its own references while a cancelled task winds down."""

TORCH_PACKAGES = ("torch", "torchvision", "timm")


class EngineTask(QgsTask):
    """A cancellable task around one engine call (`work`), which must not touch layers or widgets.

    ``on_done(task)`` is called from ``finished()`` on the main thread; it reads ``result``,
    ``outcome`` (one of the kinds below), ``message`` (one line for the analyst) and ``details``
    (a traceback for the log). ``progressed`` carries the engine's fraction and short message;
    connect it to a QObject's method so Qt queues it to the main thread.
    """

    progressed = pyqtSignal(float, str)

    OK, CANCELLED, USER, NO_TORCH, BUG = "ok", "cancelled", "user", "no_torch", "bug"
    cancelled_message = "Cancelled."
    late_cancel_discards = True
    """A cancel that comes after the engine's last check: discard the result (it is stale for the
    user) or keep it (it was already written and recorded, as an adapted model is)."""

    def __init__(self, description: str, on_done: Callable[[Any], None] | None = None) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.on_done = on_done
        self.result: Any = None
        self.outcome: str | None = None
        self.message = ""
        self.details = ""
        self.status_text = "Queued"
        LIVE_TASKS.add(self)

    def work(self) -> Any:
        """The engine call, on the worker thread; raises the engine's errors. Returns the result."""
        raise NotImplementedError

    def done_message(self) -> str:
        """The one line for a successful run."""
        return "Done."

    # -- worker thread -------------------------------------------------------------------------
    def _progress(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.status_text = message
        self.setProgress(100.0 * fraction)
        self.progressed.emit(fraction, message)

    def run(self) -> bool:
        try:
            from model_backend.core.errors import Cancelled, CdiktError
        except ImportError as exc:
            return self._fail_import(exc)
        try:
            self.result = self.work()
        except Cancelled as exc:
            return self._cancelled(str(exc))
        except CdiktError as exc:
            text = str(exc).strip()
            self.outcome, self.message = self.USER, text.splitlines()[0] if text else type(exc).__name__
            return False
        except ImportError as exc:
            return self._fail_import(exc)
        except Exception as exc:  # a bug: keep everything for the log
            self.outcome, self.message = self.BUG, f"{type(exc).__name__}: {exc}"
            self.details = traceback.format_exc()
            return False
        if self.late_cancel_discards and self.isCanceled():
            return self._cancelled()
        self.outcome = self.OK
        self.message = self.done_message()
        return True

    def _cancelled(self, text: str = "") -> bool:
        """A cancel the user asked for is a clean end, not a failure.

        Returning False would make QGIS announce "Task failed" in its message bar (it does so for
        any terminated task that ran a few seconds while its window was not in front); the
        description says it was cancelled instead.
        """
        self.outcome, self.message = self.CANCELLED, text or self.cancelled_message
        self.setDescription(f"{self.description()} (cancelled)")
        return True

    def _fail_import(self, exc: ImportError) -> bool:
        missing = getattr(exc, "name", "") or ""
        if missing.split(".")[0] in TORCH_PACKAGES:
            self.outcome = self.NO_TORCH
            self.message = (
                f"PyTorch is not available to QGIS's Python ({exc}). Install it with `make setup`, or "
                "`pip install torch` into the Python env whose site-packages is set in the "
                "cdikt/python_site_packages setting (or CDIKT_SITE_PACKAGES), then restart QGIS."
            )
        else:
            self.outcome = self.BUG
            self.message = f"The CDIKT engine could not be imported: {exc}"
        self.details = traceback.format_exc()
        return False

    # -- main thread ---------------------------------------------------------------------------
    def finished(self, ok: bool) -> None:  # noqa: D401 (QGIS API)
        try:
            if not ok and self.outcome is None:
                # cancelled before run() started, or terminated by the task manager
                self.outcome, self.message = self.CANCELLED, self.cancelled_message
            if self.on_done is not None:
                self.on_done(self)
        except Exception:
            log.exception("Error while handling the end of %s", self.description())
        finally:
            self.on_done = None
            LIVE_TASKS.discard(self)

"""Labelling drone photos on the map: the store (file + layer), the map tool, the dialog, the controller.

`LabellingController` is what the plugin holds: it finds the project's labels file (beside the
saved project, else in the user data folder), opens the Label pairs dialog on it, and turns a
Locate result the analyst confirms ("this candidate is right") into a label with one click.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsPointXY, QgsProject
from qgis.PyQt.QtCore import QObject

from ..notify import Notifier
from ..settings import CdiktSettings, engine_default_data_dir
from .dialog import LabelPairsDialog
from .map_tool import LabelMapTool
from .store import LABELS_PROPERTY, LabelStore, default_labels_path, expected_errors

__all__ = ["LABELS_PROPERTY", "LabelMapTool", "LabelPairsDialog", "LabelStore", "LabellingController",
           "accept_candidate", "default_labels_path", "expected_errors"]

TITLE = "CDIKT"


def accept_candidate(store: LabelStore, photo: str, candidate: Any, crs_wkt: str) -> int:
    """Label `photo` with a Locate candidate's footprint (centre, ground size, heading when verified).

    The candidate's polygon is in the raster's CRS (`crs_wkt`); the label is stored as the schema's
    square, so a verified, slightly skewed footprint becomes the square of the same area and centre.
    """
    from model_backend.learn.labels import ring_centre, ring_side_m

    ring = [(float(p[0]), float(p[1])) for p in candidate.polygon]
    cx, cy = ring_centre(ring)
    crs = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
    heading = getattr(candidate, "heading_deg", None)
    return store.place(photo, QgsPointXY(cx, cy), crs, ring_side_m(ring, crs_wkt), heading, raster_crs=crs)


class LabellingController(QObject):
    """Owns the project's LabelStore and the dialog; the dock's buttons call `open_dialog` and `accept`."""

    def __init__(self, iface, settings: CdiktSettings | None = None,
                 raster: Callable[[], Any] | None = None, last_result: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.iface = iface
        self.settings = settings or CdiktSettings()
        self.raster = raster or (lambda: None)
        self.last_result = last_result or (lambda: None)
        self._store: LabelStore | None = None
        self.dialog: LabelPairsDialog | None = None
        self.notifier = Notifier(iface, TITLE)

    def labels_path(self) -> Path:
        return default_labels_path(QgsProject.instance(), engine_default_data_dir())

    def store(self) -> LabelStore:
        """The store of the current project's labels file (a new one when the project was saved elsewhere)."""
        path = self.labels_path()
        if self._store is None or self._store.path != path:
            self._store = LabelStore(path, QgsProject.instance())
            self._store.ensure_layer()
        return self._store

    def _push(self, text: str, level: Qgis.MessageLevel = Qgis.Warning) -> None:
        self.notifier.push(text, level, 8)

    def _push_bug(self, what: str, exc: BaseException) -> None:
        """A bug: its traceback to the CDIKT log (call inside the `except`), one line to the analyst."""
        self.notifier.details(traceback.format_exc())
        self._push(f"{what}: unexpected {type(exc).__name__} (full traceback in the CDIKT log).", Qgis.Critical)

    def open_dialog(self) -> LabelPairsDialog | None:
        try:
            store = self.store()
        except expected_errors() as exc:  # an unreadable labels file: say which and why; never overwrite it
            self._push(f"Cannot open the labels: {exc}")
            return None
        except Exception as exc:
            self._push_bug("Cannot open the labels", exc)
            return None
        if self.dialog is None or self.dialog.store is not store:
            self.close_dialog()
            canvas = self.iface.mapCanvas() if self.iface is not None else None
            parent = self.iface.mainWindow() if self.iface is not None else None
            self.dialog = LabelPairsDialog(store, canvas, self.settings.default_footprint_m, self.raster(), parent,
                                           message=self._push)
        self.dialog.show()
        self.dialog.raise_()
        return self.dialog

    def accept(self, candidate_rank: int | None = None) -> int | None:
        """"This candidate is right": label the last located photo with the chosen candidate (#1 by default)."""
        result = self.last_result()
        if result is None or not getattr(result, "candidates", None):
            self._push("Locate a photo first; then accept the candidate that is right.", Qgis.Info)
            return None
        rank = candidate_rank or 1
        cand = next((c for c in result.candidates if c.rank == rank), result.candidates[0])
        try:
            i = accept_candidate(self.store(), result.photo, cand, result.crs_wkt)
            self.store().ensure_layer()
        except expected_errors() as exc:  # the store undid the edit: the labels file is unchanged
            self._push(f"Labels not saved: {exc}")
            return None
        except Exception as exc:
            self._push_bug("Labels not saved", exc)
            return None
        self._push(f"Labelled {Path(result.photo).name} at candidate #{cand.rank} ({len(self.store())} pairs).",
                   Qgis.Success)
        if self.dialog is not None:
            self.dialog.refresh_status()
        return i

    def close_dialog(self) -> None:
        if self.dialog is not None:
            self.dialog.release_tool()
            self.dialog.close()
            self.dialog.deleteLater()
            self.dialog = None

    def shutdown(self) -> None:
        self.close_dialog()
        self._store = None

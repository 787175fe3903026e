"""The labels of a project: one GeoPackage, rewritten (atomically) on every edit, shown as a layer.

The file is the truth, not the layer or the dialog: every edit is written at once through
`model_backend.labels` (the schema the `adapt` command reads), so labels survive a QGIS crash, a
plugin reload or a closed dialog, and a failed write (disk full, file locked) changes nothing —
the edit is undone in memory and the old file stays whole. The file sits next to the project
(`<project>_cdikt_labels.gpkg`), or in the user data folder while the project is unsaved.

Map clicks arrive in the canvas CRS; they are transformed with QGIS (which knows every CRS the
canvas can show, custom ones included) into the labels' CRS — the raster's, chosen when the
first label is made — and the footprint square is computed there in ground metres.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFillSymbol,
    QgsPalLayerSettings,
    QgsPointXY,
    QgsProject,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtGui import QColor

log = logging.getLogger(__name__)

LABELS_PROPERTY = "cdikt/labels_path"
"""Custom layer property marking the project layer that shows a labels file."""
LAYER_NAME = "CDIKT labelled pairs"
LABEL_COLOUR = "#00c2ff"
MAX_UNDO = 100


def default_labels_path(project: QgsProject, data_dir: str) -> Path:
    """Beside the saved project, else in the user data folder (an unsaved project has no folder)."""
    if project.fileName():
        return Path(project.absolutePath()) / f"{project.baseName()}_cdikt_labels.gpkg"
    return Path(data_dir) / "labels" / "unsaved_project_labels.gpkg"


class LabelStore(QObject):
    """Labels of one file with undo; `changed` fires after every successful edit (and after undo)."""

    changed = pyqtSignal()

    def __init__(self, path: str | Path, project: QgsProject | None = None) -> None:
        super().__init__()
        from model_backend.labels import WGS84_WKT, LabelSet, read_labels

        self.path = Path(path)
        self.project = project or QgsProject.instance()
        if self.path.exists():
            self.labels = read_labels(self.path)
        else:
            self.labels = LabelSet([], WGS84_WKT, str(self.path))
        self._undo: list[tuple[list, str]] = []

    # -- queries ---------------------------------------------------------------------------
    @property
    def crs(self) -> QgsCoordinateReferenceSystem:
        return QgsCoordinateReferenceSystem.fromWkt(self.labels.crs_wkt)

    def __len__(self) -> int:
        return len(self.labels.labels)

    def index_of(self, photo: str | Path) -> int | None:
        want = Path(photo).absolute()
        for i, lb in enumerate(self.labels.labels):
            if self.labels.photo_path(lb).absolute() == want:
                return i
        return None

    def labelled_photos(self) -> set[Path]:
        return {self.labels.photo_path(lb).absolute() for lb in self.labels.labels}

    def footprint(self, i: int) -> tuple[float, float, float, float | None]:
        """(cx, cy, side_m, heading) of label i in the labels' CRS."""
        from model_backend.labels import ring_centre, ring_side_m

        lb = self.labels.labels[i]
        cx, cy = ring_centre(lb.ring)
        return cx, cy, ring_side_m(lb.ring, self.labels.crs_wkt), lb.heading

    # -- edits (each one saved at once) ------------------------------------------------------
    def _edit(self, change: Callable[[], None]) -> None:
        snapshot = (copy.deepcopy(self.labels.labels), self.labels.crs_wkt)
        try:
            change()
            self.save()
        except BaseException:
            self.labels.labels, self.labels.crs_wkt = snapshot
            raise
        self._undo.append(snapshot)
        del self._undo[:-MAX_UNDO]
        self.changed.emit()

    def save(self) -> None:
        from model_backend.labels import write_labels

        write_labels(self.path, self.labels)
        layer = self.find_layer()
        if layer is not None:
            layer.dataProvider().reloadData()
            layer.triggerRepaint()

    def _to_labels_crs(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> QgsPointXY:
        if not crs.isValid() or crs == self.crs:
            return QgsPointXY(point)
        return QgsCoordinateTransform(crs, self.crs, self.project).transform(point)

    def place(self, photo: str | Path, point: QgsPointXY, point_crs: QgsCoordinateReferenceSystem, side_m: float,
              heading: float | None, raster_crs: QgsCoordinateReferenceSystem | None = None) -> int:
        """Label `photo` at `point` (in `point_crs`), or move its label there; returns the label's index.

        The first label fixes the file's CRS to `raster_crs` (the raster being labelled).
        """
        from model_backend.labels import Label, file_sha256, now_iso, square_footprint

        def change() -> None:
            if not self.labels.labels and raster_crs is not None and raster_crs.isValid():
                self.labels.crs_wkt = raster_crs.toWkt()
            p = self._to_labels_crs(point, point_crs)
            ring = square_footprint(p.x(), p.y(), side_m, heading, self.labels.crs_wkt)
            i = self.index_of(photo)
            if i is None:
                self.labels.labels.append(Label(photo=self.labels.stored_photo(photo), ring=ring, heading=heading,
                                                photo_sha256=file_sha256(photo)))
            else:
                lb = self.labels.labels[i]
                lb.ring, lb.heading, lb.edited = ring, heading, now_iso()

        self._edit(change)
        found = self.index_of(photo)
        assert found is not None
        return found

    def reshape(self, i: int, side_m: float | None = None, heading: float | None = None,
                set_heading: bool = False) -> None:
        """Resize (`side_m`) and/or rotate (`heading` when `set_heading`) label i about its centre."""
        from model_backend.labels import now_iso, square_footprint

        cx, cy, side, old_heading = self.footprint(i)

        def change() -> None:
            lb = self.labels.labels[i]
            new_heading = heading if set_heading else old_heading
            lb.ring = square_footprint(cx, cy, side_m or side, new_heading, self.labels.crs_wkt)
            lb.heading, lb.edited = new_heading, now_iso()

        self._edit(change)

    def delete(self, i: int) -> None:
        self._edit(lambda: self.labels.labels.pop(i))

    def undo(self) -> bool:
        """Back to the state before the last edit (saved too); False when there is nothing to undo."""
        if not self._undo:
            return False
        current = (copy.deepcopy(self.labels.labels), self.labels.crs_wkt)
        self.labels.labels, self.labels.crs_wkt = self._undo.pop()
        try:
            self.save()
        except BaseException:
            self._undo.append((self.labels.labels, self.labels.crs_wkt))
            self.labels.labels, self.labels.crs_wkt = current
            raise
        self.changed.emit()
        return True

    # -- the map layer -----------------------------------------------------------------------
    def find_layer(self) -> QgsVectorLayer | None:
        for layer in self.project.mapLayers().values():
            if layer.customProperty(LABELS_PROPERTY) == str(self.path):
                return layer
        return None

    def ensure_layer(self) -> QgsVectorLayer | None:
        """The project layer showing this file (added and styled once; reused after a plugin reload)."""
        layer = self.find_layer()
        if layer is not None or not self.path.exists():
            return layer
        layer = QgsVectorLayer(f"{self.path}|layername=labels", LAYER_NAME, "ogr")
        if not layer.isValid():
            log.warning("QGIS cannot open the labels file %s", self.path)
            return None
        layer.setCustomProperty(LABELS_PROPERTY, str(self.path))
        style_labels(layer)
        self.project.addMapLayer(layer)
        return layer


def style_labels(layer: QgsVectorLayer) -> None:
    """Cyan outline, light fill, labelled with the photo's file name."""
    symbol = QgsFillSymbol.createSimple({"color": "0,194,255,40", "outline_color": LABEL_COLOUR,
                                         "outline_width": "0.7", "outline_width_unit": "MM"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    text = QgsTextFormat()
    text.setSize(9)
    text.setColor(QColor(LABEL_COLOUR))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setColor(QColor("black"))
    text.setBuffer(buffer)
    pal = QgsPalLayerSettings()
    pal.fieldName = "regexp_substr(\"photo\", '[^/\\\\\\\\]+$')"
    pal.isExpression = True
    pal.setFormat(text)
    pal.placement = QgsPalLayerSettings.OverPoint
    layer.setLabeling(QgsVectorLayerSimpleLabeling(pal))
    layer.setLabelsEnabled(True)

"""The map tool that places labels: click where the selected photo was taken, Shift+click to aim it.

The tool only reports clicks in map coordinates with the canvas CRS; what a click means (a new
label, a moved one, a new heading) is decided by the dialog and the store, so the tool stays
trivially testable with synthetic QgsMapMouseEvents on a real canvas.
"""

from __future__ import annotations

from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QCursor


class LabelMapTool(QgsMapTool):
    """Left click: `placed(point, crs)`. Shift + left click: `aimed(point, crs)` (turn the top edge towards it)."""

    placed = pyqtSignal(object, object)  # QgsPointXY, QgsCoordinateReferenceSystem
    aimed = pyqtSignal(object, object)

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.setCursor(QCursor(Qt.CrossCursor))

    def canvas_crs(self) -> QgsCoordinateReferenceSystem:
        return self.canvas().mapSettings().destinationCrs()

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 (QGIS API)
        if event.button() != Qt.LeftButton:
            return
        point = QgsPointXY(event.mapPoint())
        if event.modifiers() & Qt.ShiftModifier:
            self.aimed.emit(point, self.canvas_crs())
        else:
            self.placed.emit(point, self.canvas_crs())

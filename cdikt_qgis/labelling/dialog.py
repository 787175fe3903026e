"""The Label pairs dialog: a folder of photos, which are labelled, and the map tool to label them.

Non-modal, so the analyst pans and zooms the map while it is open. Select a photo, press
"Place on map" and click where it was taken: its footprint (a square of the photo's ground size,
from EXIF when the photo says, else the size box) appears at once in the labels layer. Clicking
again moves it; Shift+click turns its top edge towards the click; the size and heading boxes
resize and rotate the selected label; Delete and Undo do what they say. Every change is saved.

A failed edit changes nothing (the store undoes it in memory, the file is replaced only whole).
Expected failures (a locked or full disk, an unreadable photo, a point the CRSs cannot convert)
are said in one line; anything else is a bug, so its traceback goes to the CDIKT log as well.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsMapLayerProxyModel,
    QgsMessageLog,
    QgsPointXY,
    QgsRasterLayer,
)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..dock import load_thumbnail
from .map_tool import LabelMapTool
from .store import LabelStore, expected_errors

log = logging.getLogger(__name__)
LOG_TAG = "CDIKT"
T = TypeVar("T")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
ICON = QSize(96, 72)


def list_photos(folder: str | Path) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        return []
    return sorted((q for q in p.iterdir() if q.is_file() and q.suffix.lower() in PHOTO_SUFFIXES
                   and not q.name.startswith(".")), key=lambda q: q.name.lower())


class LabelPairsDialog(QDialog):
    """Photos on the left, the selected photo's label controls on the right; the canvas does the rest."""

    def __init__(self, store: LabelStore, canvas, default_side_m: float = 60.0,
                 raster: QgsRasterLayer | None = None, parent: QWidget | None = None,
                 message: Callable[[str, Qgis.MessageLevel], None] | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Label pairs: where was each photo taken?")
        self.setObjectName("CdiktLabelPairsDialog")
        self.store = store
        self.canvas = canvas
        self.default_side_m = default_side_m
        self.message = message  # the controller's message bar, or None (the status line only)
        self.tool = LabelMapTool(canvas) if canvas is not None else None
        self._previous_tool = None
        self._updating = False
        self._build(raster)
        if self.tool is not None:
            self.tool.placed.connect(self.place_at)
            self.tool.aimed.connect(self.aim_at)
            self.tool.deactivated.connect(lambda: self.place_button.setChecked(False))
        store.changed.connect(self.refresh_status)

    # -- construction ------------------------------------------------------------------------
    def _build(self, raster: QgsRasterLayer | None) -> None:
        outer = QVBoxLayout(self)
        form = QFormLayout()
        self.raster_combo = QgsMapLayerComboBox(self)
        self.raster_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        if raster is not None:
            self.raster_combo.setLayer(raster)
        form.addRow("Raster", self.raster_combo)
        self.folder_widget = QgsFileWidget(self)
        self.folder_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.folder_widget.setDialogTitle("Folder of drone photos")
        self.folder_widget.fileChanged.connect(self.set_folder)
        form.addRow("Photos", self.folder_widget)
        outer.addLayout(form)

        body = QHBoxLayout()
        self.photo_list = QListWidget(self)
        self.photo_list.setIconSize(ICON)
        self.photo_list.currentItemChanged.connect(self._selected)
        body.addWidget(self.photo_list, 2)
        side = QFormLayout()
        self.side_spin = QDoubleSpinBox(self)
        self.side_spin.setRange(1.0, 10000.0)
        self.side_spin.setDecimals(1)
        self.side_spin.setSuffix(" m")
        self.side_spin.setValue(self.default_side_m)
        self.side_spin.setToolTip("Ground size of the photo's short side (the footprint square's side).")
        self.side_spin.valueChanged.connect(self._side_changed)
        side.addRow("Size", self.side_spin)
        self.heading_spin = QDoubleSpinBox(self)
        self.heading_spin.setRange(0.0, 359.9)
        self.heading_spin.setDecimals(1)
        self.heading_spin.setWrapping(True)
        self.heading_spin.setSuffix(" °")
        self.heading_spin.setToolTip("Where the photo's top edge faces, clockwise from north (Shift+click aims it).")
        self.heading_spin.valueChanged.connect(self._heading_changed)
        side.addRow("Heading", self.heading_spin)
        self.place_button = QPushButton("Place on map", self)
        self.place_button.setCheckable(True)
        self.place_button.setToolTip("Then click the map where the selected photo was taken (Shift+click: aim).")
        self.place_button.toggled.connect(self._toggle_tool)
        self.delete_button = QPushButton("Delete label", self)
        self.delete_button.clicked.connect(self.delete_selected)
        self.undo_button = QPushButton("Undo", self)
        self.undo_button.clicked.connect(self.undo)
        for b in (self.place_button, self.delete_button, self.undo_button):
            side.addRow(b)
        holder = QWidget(self)
        holder.setLayout(side)
        body.addWidget(holder, 1)
        outer.addLayout(body)
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        outer.addWidget(self.status)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Close, self)
        self.buttons.rejected.connect(self.reject)  # Close has the reject role; done() releases the map tool
        outer.addWidget(self.buttons)
        self.resize(640, 420)
        self.refresh_status()

    # -- photos ------------------------------------------------------------------------------
    def set_folder(self, folder: str) -> None:
        if self.folder_widget.filePath() != folder:
            self.folder_widget.setFilePath(folder)  # emits fileChanged -> back here once
            return
        self.photo_list.clear()
        for photo in list_photos(folder):
            item = QListWidgetItem(photo.name)
            item.setData(Qt.UserRole, str(photo.absolute()))
            pix = load_thumbnail(str(photo), ICON)
            if not pix.isNull():
                item.setIcon(QIcon(pix))
            self.photo_list.addItem(item)
        self.refresh_status()

    def selected_photo(self) -> str | None:
        item = self.photo_list.currentItem()
        return item.data(Qt.UserRole) if item is not None else None

    def select_photo(self, photo: str | Path) -> None:
        want = str(Path(photo).absolute())
        for i in range(self.photo_list.count()):
            if self.photo_list.item(i).data(Qt.UserRole) == want:
                self.photo_list.setCurrentRow(i)
                return

    def refresh_status(self) -> None:
        items = [self.photo_list.item(i) for i in range(self.photo_list.count())]
        done = self.store.labelled_among(item.data(Qt.UserRole) for item in items)  # by path, else by content
        for item in items:
            labelled = Path(item.data(Qt.UserRole)) in done
            item.setText(f"{Path(item.data(Qt.UserRole)).name}\n{'✓ labelled' if labelled else 'not labelled'}")
            item.setData(Qt.UserRole + 1, labelled)
        self.status.setText(f"{len(self.store)} labelled pairs, saved in {self.store.path}")
        self.undo_button.setEnabled(bool(self.store._undo))

    def _selected(self, *_: object) -> None:
        photo = self.selected_photo()
        i = self.store.index_of(photo) if photo else None
        self._updating = True
        try:
            if i is not None:
                _, _, side, heading = self.store.footprint(i)
                self.side_spin.setValue(side)
                self.heading_spin.setValue((heading or 0.0) % 360.0)
            elif photo:
                self._prefill_from_exif(photo)
        finally:
            self._updating = False

    def _prefill_from_exif(self, photo: str) -> None:
        from model_backend.geo.exif import read_priors  # no torch

        priors = read_priors(photo)
        side = priors.ground_short_side_m()
        self.side_spin.setValue(side if side else self.default_side_m)
        self.heading_spin.setValue((priors.yaw_deg or 0.0) % 360.0)

    # -- edits -------------------------------------------------------------------------------
    def _report(self, exc: BaseException) -> None:
        """Say in one line why the labels were not saved (an expected error: bad input, the disk)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._say(f"Labels not saved: {first}", Qgis.Warning)

    def _report_bug(self, exc: BaseException) -> None:
        """A bug: the traceback to the CDIKT log (call inside the `except`), one line to the analyst.

        Not re-raised: out of a Qt slot it would end in QGIS's Python error dialog (or abort
        QGIS without one), and the store has already undone the edit, so nothing is lost.
        """
        QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.Critical)
        self._say(f"Labels not saved: unexpected {type(exc).__name__} (full traceback in the CDIKT log).",
                  Qgis.Critical)

    def _say(self, text: str, level: Qgis.MessageLevel) -> None:
        self.status.setText(text)
        if self.message:
            self.message(text, level)

    def _raster_crs(self) -> QgsCoordinateReferenceSystem | None:
        layer = self.raster_combo.currentLayer()
        return layer.crs() if layer is not None else None

    def _guarded(self, edit: Callable[[], T]) -> T | None:
        """Run one edit; on failure say why (expected errors) or log the bug, and return None.

        Every edit slot goes through here: an exception escaping a Qt slot would bypass the
        analyst's message, and the store has already undone the failed edit, so nothing is lost.
        """
        try:
            return edit()
        except expected_errors() as exc:
            self._report(exc)
        except Exception as exc:
            self._report_bug(exc)
        return None

    def place_at(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> int | None:
        photo = self.selected_photo()
        if not photo:
            self.status.setText("Select a photo in the list first, then click where it was taken.")
            return None

        def place() -> int:
            i = self.store.place(photo, point, crs, self.side_spin.value(), self.heading_spin.value(),
                                 self._raster_crs())
            self.store.ensure_layer()
            return i

        return self._guarded(place)

    def aim_at(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> None:
        """Turn the selected label so its top edge faces `point`."""
        photo = self.selected_photo()
        i = self.store.index_of(photo) if photo else None
        if i is None:
            self.status.setText("Place the photo first; Shift+click then aims its top edge.")
            return
        from model_backend.geo.geodesy import metres_per_unit

        def heading_to_point() -> float:
            p = self.store.to_labels_crs(point, crs)
            cx, cy, _, _ = self.store.footprint(i)
            mx, my = metres_per_unit(self.store.labels.crs_wkt, cx, cy)
            return math.degrees(math.atan2((p.x() - cx) * mx, (p.y() - cy) * my)) % 360.0

        heading = self._guarded(heading_to_point)
        if heading is not None:
            self.heading_spin.setValue(heading)  # -> _heading_changed reshapes and saves

    def _side_changed(self, value: float) -> None:
        self._reshape(side_m=value)

    def _heading_changed(self, value: float) -> None:
        self._reshape(heading=value, set_heading=True)

    def _reshape(self, **kw) -> None:
        photo = self.selected_photo()
        i = self.store.index_of(photo) if (photo and not self._updating) else None
        if i is not None:
            self._guarded(lambda: self.store.reshape(i, photo=photo, **kw))

    def delete_selected(self) -> None:
        photo = self.selected_photo()
        i = self.store.index_of(photo) if photo else None
        if i is not None:
            self._guarded(lambda: self.store.delete(i))

    def undo(self) -> None:
        self._guarded(self.store.undo)
        self._selected()

    # -- map tool ----------------------------------------------------------------------------
    def _toggle_tool(self, on: bool) -> None:
        if self.tool is None:
            return
        if on and self.canvas.mapTool() is not self.tool:
            self._previous_tool = self.canvas.mapTool()
            self.canvas.setMapTool(self.tool)
        elif not on and self.canvas.mapTool() is self.tool:
            self.canvas.unsetMapTool(self.tool)
            if self._previous_tool is not None:
                self.canvas.setMapTool(self._previous_tool)
            self._previous_tool = None

    def release_tool(self) -> None:
        """Give the canvas its previous tool back (dialog closed, plugin unloaded)."""
        self.place_button.setChecked(False)
        if self.tool is not None and self.canvas is not None and self.canvas.mapTool() is self.tool:
            self.canvas.unsetMapTool(self.tool)

    def done(self, result: int) -> None:
        self.release_tool()
        super().done(result)

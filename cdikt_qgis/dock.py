"""The "Locate drone image" dock, built in code (no .ui file to keep in sync).

The dock only collects inputs into a ``LocateParams`` and shows state; it emits signals and
never runs anything itself, so the controller decides how work is scheduled and widgets can
be tested without the engine. Cancel is a visible button next to Locate (a peer's users could
not find how to cancel).
"""

from __future__ import annotations

import os

from qgis.core import QgsMapLayer, QgsMapLayerProxyModel
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QImageReader, QPixmap
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .model_panel import ModelPanel, ProgressStatus
from .settings import CdiktSettings
from .tasks import LocateParams

PHOTO_FILTER = "Images (*.jpg *.jpeg *.JPG *.JPEG *.png *.PNG *.tif *.tiff *.TIF *.TIFF);;All files (*)"
THUMB = QSize(280, 180)
_PLACEHOLDER_STYLE = "QLabel { color: palette(mid); border: 1px dashed palette(mid); }"


def load_thumbnail(path: str, size: QSize = THUMB) -> QPixmap:
    """A small preview turned upright per EXIF orientation (drone JPEGs are often rotated).

    Decoding at reduced size keeps a 20-megapixel JPEG preview fast; the scaled size is set on
    the stored image and the EXIF transform is applied after, so the aspect ratio stays right.
    """
    reader = QImageReader(path)
    reader.setAutoTransform(True)
    stored = reader.size()
    if stored.isValid():
        reader.setScaledSize(stored.scaled(size * 2, Qt.KeepAspectRatio))
    image = reader.read()
    if image.isNull():
        return QPixmap()
    return QPixmap.fromImage(image.scaled(size, Qt.KeepAspectRatio, Qt.SmoothTransformation))


class LocateDock(ProgressStatus, QDockWidget):
    """Inputs for one localisation, progress, and the export button."""

    locate_requested = pyqtSignal(object)  # LocateParams
    cancel_requested = pyqtSignal()
    export_requested = pyqtSignal(str)  # destination path

    def __init__(self, settings: CdiktSettings | None = None, parent: QWidget | None = None) -> None:
        super().__init__("Locate drone image", parent)
        self.setObjectName("CdiktLocateDock")
        self.settings = settings or CdiktSettings()
        self._build()
        self.set_running(False)
        self.set_result_available(False)

    # -- construction --------------------------------------------------------------------------
    def _build(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)

        self.layer_combo = QgsMapLayerComboBox(body)
        self.layer_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layer_combo.setToolTip("Orthophoto or satellite raster to search in (a local file).")
        form.addRow("Raster", self.layer_combo)

        self.photo_widget = QgsFileWidget(body)
        self.photo_widget.setStorageMode(QgsFileWidget.GetFile)
        self.photo_widget.setFilter(PHOTO_FILTER)
        self.photo_widget.setDialogTitle("Drone photo")
        self.photo_widget.setToolTip("The drone photo to locate (JPEG/PNG/TIFF).")
        self.photo_widget.fileChanged.connect(self._photo_changed)
        form.addRow("Photo", self.photo_widget)

        self.thumbnail = QLabel("No photo", body)
        self.thumbnail.setAlignment(Qt.AlignCenter)
        self.thumbnail.setMinimumHeight(THUMB.height() // 2)
        self.thumbnail.setMaximumHeight(THUMB.height())
        self.thumbnail.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Preferred)
        self.thumbnail.setStyleSheet(_PLACEHOLDER_STYLE)
        form.addRow(self.thumbnail)

        fp_row = QHBoxLayout()
        self.footprint_spin = QDoubleSpinBox(body)
        self.footprint_spin.setRange(5.0, 5000.0)
        self.footprint_spin.setDecimals(0)
        self.footprint_spin.setSingleStep(10.0)
        self.footprint_spin.setSuffix(" m")
        self.footprint_spin.setValue(self.settings.default_footprint_m)
        self.footprint_spin.setToolTip(
            "Ground size of the photo's short side. Also the size of the raster tiles searched."
        )
        self.footprint_auto = QCheckBox("From EXIF / auto", body)
        self.footprint_auto.setChecked(self.settings.footprint_from_exif)
        self.footprint_auto.setToolTip(
            "Estimate the footprint from the photo's EXIF (altitude, focal length); without EXIF, try "
            "several sizes around the value on the left."
        )
        fp_row.addWidget(self.footprint_spin, 1)
        fp_row.addWidget(self.footprint_auto)
        form.addRow("Footprint", fp_row)

        self.top_k_spin = QSpinBox(body)
        self.top_k_spin.setRange(1, 50)
        self.top_k_spin.setValue(self.settings.top_k)
        self.top_k_spin.setToolTip("How many distinct candidate places to list.")
        form.addRow("Candidates", self.top_k_spin)

        self.verify_check = QCheckBox("Verify footprint (local features)", body)
        self.verify_check.setChecked(True)
        self.verify_check.setToolTip(
            "Match local features between the photo and the raster around the best candidates to recover "
            "the photo's real footprint, heading and a confidence. Skipped automatically for oblique photos."
        )
        form.addRow("", self.verify_check)
        self.gps_radius_spin = QDoubleSpinBox(body)
        self.gps_radius_spin.setRange(0.0, 100000.0)
        self.gps_radius_spin.setDecimals(0)
        self.gps_radius_spin.setSingleStep(50.0)
        self.gps_radius_spin.setSuffix(" m")
        self.gps_radius_spin.setSpecialValueText("anywhere")
        self.gps_radius_spin.setToolTip(
            "Search only within this distance of the photo's EXIF GPS position (0 = search the whole raster; "
            "a best match far from the GPS is flagged either way)."
        )
        form.addRow("Near GPS", self.gps_radius_spin)
        outer.addLayout(form)

        buttons = QHBoxLayout()
        self.locate_button = QPushButton("Locate", body)
        self.locate_button.setDefault(True)
        self.locate_button.clicked.connect(self._emit_locate)
        self.cancel_button = QPushButton("Cancel", body)
        self.cancel_button.clicked.connect(self.cancel_requested)
        buttons.addWidget(self.locate_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        outer.addLayout(buttons)

        self.progress = QProgressBar(body)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status = QLabel("Ready.", body)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        outer.addWidget(self.status)

        self.export_button = QPushButton("Export GeoJSON…", body)
        self.export_button.setToolTip("Save the ranked footprints as RFC 7946 GeoJSON (WGS84).")
        self.export_button.clicked.connect(self._ask_export_path)
        outer.addWidget(self.export_button)
        self.model_panel = ModelPanel(body)  # model picker, labelling, adapt, roll back (controllers: plugin.py)
        outer.addWidget(self.model_panel)
        outer.addStretch(1)
        self.setWidget(body)

    # -- inputs --------------------------------------------------------------------------------
    def set_layer(self, layer: QgsMapLayer | None) -> None:
        """Preselect a layer (the active one) when it is a raster."""
        if layer is not None and layer.type() == QgsMapLayer.RasterLayer:
            self.layer_combo.setLayer(layer)

    def photo_path(self) -> str:
        return self.photo_widget.filePath().strip()

    def set_photo(self, path: str) -> None:
        self.photo_widget.setFilePath(path)  # emits fileChanged -> thumbnail

    def _photo_changed(self, path: str) -> None:
        pix = load_thumbnail(path) if path and os.path.isfile(path) else QPixmap()
        if pix.isNull():
            self.thumbnail.setPixmap(QPixmap())
            self.thumbnail.setText("No preview" if path else "No photo")
            self.thumbnail.setStyleSheet(_PLACEHOLDER_STYLE)
            self.thumbnail.setToolTip("")
        else:
            self.thumbnail.setStyleSheet("")
            self.thumbnail.setPixmap(pix)
            self.thumbnail.setToolTip(os.path.basename(path))

    def params(self) -> LocateParams:
        return LocateParams(
            layer=self.layer_combo.currentLayer(), photo=self.photo_path(),
            footprint_m=float(self.footprint_spin.value()), footprint_auto=self.footprint_auto.isChecked(),
            top_k=int(self.top_k_spin.value()),
            verify=None if self.verify_check.isChecked() else False,
            prior_radius_m=float(self.gps_radius_spin.value()) or None,
        )

    def _emit_locate(self) -> None:
        self.locate_requested.emit(self.params())

    def _ask_export_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export candidates", "", "GeoJSON (*.geojson)")
        if path:
            self.export_requested.emit(path)

    # -- state shown to the user ---------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)
            self.status.setText("Starting…")

    def set_result_available(self, available: bool) -> None:
        self.export_button.setEnabled(available)
        self.model_panel.accept_button.setEnabled(available)

"""The "Locate drone image" dock, built in code (no .ui file to keep in sync).

The dock only collects inputs into a ``LocateParams`` and shows state; it emits signals and
never runs anything itself, so the controller decides how work is scheduled and widgets can
be tested without the engine. Cancel is a visible button next to Locate (a peer's users could
not find how to cancel).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayer, QgsMapLayerProxyModel
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QSize, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QImageReader, QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from model_backend.geo.geodesy import GEOD  # torch-free: great-circle metres

from .model_panel import ModelPanel, ProgressStatus
from .settings import CdiktSettings
from .tasks import FLIGHT_DEFAULTS, LocateParams

PHOTO_FILTER = "Images (*.jpg *.jpeg *.JPG *.JPEG *.png *.PNG *.tif *.tiff *.TIF *.TIFF);;All files (*)"
THUMB = QSize(280, 180)
_PLACEHOLDER_STYLE = "QLabel { color: palette(mid); border: 1px dashed palette(mid); }"
HEARTBEAT_MS = 500
QUIET_S = 1.0
"""A stage quiet for longer than this shows its elapsed time, so the dock visibly moves every second."""


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
    flight_requested = pyqtSignal(object)  # LocateParams whose photo is the flight's folder
    cancel_requested = pyqtSignal()
    export_requested = pyqtSignal(str)  # destination path

    def __init__(self, settings: CdiktSettings | None = None, parent: QWidget | None = None) -> None:
        super().__init__("Locate drone image", parent)
        self.setObjectName("CdiktLocateDock")
        self.settings = settings or CdiktSettings()
        self._stage = ("", 0.0)  # (message, when it arrived): the heartbeat adds the elapsed time
        self._build()
        self._heartbeat = QTimer(self)
        self._heartbeat.setInterval(HEARTBEAT_MS)
        self._heartbeat.timeout.connect(self._beat)
        self.set_running(False)
        self.set_result_available(False)

    # -- construction --------------------------------------------------------------------------
    def _build(self) -> None:
        # In a scroll area: docked beside the Processing Toolbox the dock is short, and rows must
        # scroll rather than overlap the thumbnail.
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # rows wrap to the dock's width instead
        body = QWidget(scroll)
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
        self.footprint_auto = QCheckBox("Auto", body)
        self.footprint_auto.setChecked(self.settings.footprint_from_exif)
        self.footprint_auto.setToolTip(
            "Estimate the footprint from the photo's EXIF (altitude, focal length); without EXIF, try "
            "several sizes around the value on the left."
        )
        self.tolerance_spin = QSpinBox(body)
        self.tolerance_spin.setRange(0, 100)
        self.tolerance_spin.setSingleStep(5)
        self.tolerance_spin.setPrefix("± ")
        self.tolerance_spin.setSuffix(" %")
        self.tolerance_spin.setValue(round(self.settings.footprint_tolerance_pct))
        self.tolerance_spin.setToolTip(
            "How far the footprint (typed, or from EXIF) may be off: sizes this much smaller and larger are "
            "searched too, and the one that matches best is used (shown under Used). 0: exactly this size. "
            "Each size is indexed once per raster."
        )
        fp_row.addWidget(self.footprint_spin, 1)
        fp_row.addWidget(self.tolerance_spin)
        fp_row.addWidget(self.footprint_auto)
        form.addRow("Footprint", fp_row)
        self.footprint_used = QLabel("", body)
        self.footprint_used.setToolTip("The footprint the last Locate really used, and where it came from.")
        form.addRow("Used", self.footprint_used)

        self.top_k_spin = QSpinBox(body)
        self.top_k_spin.setRange(1, 50)
        self.top_k_spin.setValue(self.settings.top_k)
        self.top_k_spin.setToolTip("How many distinct candidate places to list.")
        form.addRow("Candidates", self.top_k_spin)

        self.verify_check = QCheckBox("Verify footprint", body)
        self.verify_check.setChecked(True)
        self.verify_check.setToolTip(
            "Match local features between the photo and the raster around the best candidates to recover "
            "the photo's real footprint, heading and a confidence. Skipped automatically for oblique photos."
        )
        form.addRow("", self.verify_check)
        self.structure_check = QCheckBox("Compare the ground's shapes", body)
        self.structure_check.setChecked(True)
        self.structure_check.setToolTip(
            "Re-rank the best candidates by field edges, roads and shorelines, which stay when colours change: "
            "what finds the place when the photo and the map are of other seasons or years. About 1.5 s per "
            "photo; single photos only (a flight's track does this work)."
        )
        form.addRow("", self.structure_check)
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
        self.flight_widget = QgsFileWidget(body)
        self.flight_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.flight_widget.setDialogTitle("Flight folder")
        self.flight_widget.setToolTip(
            "A folder of one flight's photos, to locate together with \"Locate flight\": ordered by their EXIF "
            "time, each photo is located as above, then the track a drone could have flown through their best "
            "places is chosen. Photos that fit no place near their neighbours are flagged, not forced.")
        form.addRow("Flight", self.flight_widget)
        self.speed_spin = QDoubleSpinBox(body)
        self.speed_spin.setRange(1.0, 150.0)
        self.speed_spin.setDecimals(0)
        self.speed_spin.setValue(FLIGHT_DEFAULTS.max_speed_m_s)
        self.speed_spin.setSuffix(" m/s")
        self.speed_spin.setToolTip(
            "The fastest the drone flew over the ground: consecutive photos' places must be reachable at this "
            "speed in the time between them. Too low breaks the track at fast legs; too high lets it jump.")
        self.motion_check = QCheckBox("Match photo to photo", body)
        self.motion_check.setChecked(FLIGHT_DEFAULTS.motion)
        self.motion_check.setToolTip(
            "Match each photo with the one before to measure how far the drone moved (about 0.2 s a photo); "
            "the track must agree. Off: only the speed limits the track.")
        speed_row = QHBoxLayout()
        speed_row.addWidget(self.speed_spin, 1)
        speed_row.addWidget(self.motion_check, 2)
        form.addRow("Top speed", speed_row)
        self.flight_log_widget = QgsFileWidget(body)
        self.flight_log_widget.setFilter("Flight log (*.csv)")
        self.flight_log_widget.setDialogTitle("Flight log (optional)")
        self.flight_log_widget.setToolTip(
            "Optional: a CSV log of the flight (UAV-VisLoc columns: filename, date, lat, lon, height, Phi1). "
            "Its times order the photos and its positions are a prior, in place of the photos' EXIF.")
        form.addRow("Flight log", self.flight_log_widget)
        outer.addLayout(form)

        buttons = QHBoxLayout()
        self.locate_button = QPushButton("Locate", body)
        self.locate_button.setDefault(True)
        self.locate_button.clicked.connect(self._emit_locate)
        self.cancel_button = QPushButton("Cancel", body)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.flight_button = QPushButton("Locate flight", body)
        self.flight_button.setToolTip("Locate every photo of the flight folder as one track (see Flight).")
        self.flight_button.clicked.connect(self._emit_flight)
        buttons.addWidget(self.locate_button, 2)
        buttons.addWidget(self.flight_button, 2)
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

        self.candidates_table = QTableWidget(0, 4, body)
        self.candidates_table.setObjectName("CdiktCandidates")
        self.candidates_table.setHorizontalHeaderLabels(["#", "Score", "Verified", "From #1"])
        self.candidates_table.verticalHeader().setVisible(False)
        self.candidates_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.candidates_table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.candidates_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        header = self.candidates_table.horizontalHeader()
        for col in range(3):
            header.setSectionResizeMode(col, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.Stretch)
        self.candidates_table.setToolTip("The ranked candidates; select one and use \"This candidate is right\" "
                                         "below to save it as a labelled pair (it matters most when #1 is wrong).")
        self.candidates_table.setMinimumHeight(90)
        outer.addWidget(self.candidates_table)

        self.export_button = QPushButton("Export GeoJSON…", body)
        self.export_button.setToolTip("Save the ranked footprints as RFC 7946 GeoJSON (WGS84).")
        self.export_button.clicked.connect(self._ask_export_path)
        outer.addWidget(self.export_button)
        cache_row = QHBoxLayout()
        self.cache_label = QLabel("", body)
        self.cache_label.setToolTip(f"Indexes, runtime exports and results in {self.settings.effective_cache_dir()}; "
                                    "measured after each Locate.")
        self.cache_limit_spin = QDoubleSpinBox(body)
        self.cache_limit_spin.setRange(0.0, 10000.0)
        self.cache_limit_spin.setDecimals(0)
        self.cache_limit_spin.setSuffix(" GB")
        self.cache_limit_spin.setSpecialValueText("no limit")
        self.cache_limit_spin.setValue(self.settings.cache_max_gb)
        self.cache_limit_spin.setToolTip(
            "After each Locate the least recently used raster indexes are removed until the cache fits "
            "(never the raster just searched, nor results still shown). 0 = no limit. The command line "
            "does the same with: python -m model_backend cache --prune --max-gb N."
        )
        self.cache_limit_spin.valueChanged.connect(self._cache_limit_changed)
        cache_row.addWidget(self.cache_label, 1)
        cache_row.addWidget(QLabel("limit", body))
        cache_row.addWidget(self.cache_limit_spin)
        cache_form = QFormLayout()
        cache_form.addRow("Cache", cache_row)
        outer.addLayout(cache_form)
        self.model_panel = ModelPanel(body)  # model picker, labelling, adapt, roll back (controllers: plugin.py)
        outer.addWidget(self.model_panel)
        outer.addStretch(1)
        scroll.setWidget(body)
        self.setWidget(scroll)

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
            structure=self.structure_check.isChecked(),
            prior_radius_m=float(self.gps_radius_spin.value()) or None,
            tolerance_pct=float(self.tolerance_spin.value()),
        )

    def _emit_locate(self) -> None:
        self.locate_requested.emit(self.params())

    def flight_folder(self) -> str:
        return self.flight_widget.filePath().strip()

    def _emit_flight(self) -> None:
        log = self.flight_log_widget.filePath().strip()
        self.flight_requested.emit(replace(self.params(), photo=self.flight_folder(),
                                           max_speed_m_s=float(self.speed_spin.value()),
                                           motion=self.motion_check.isChecked(), flight_log=log or None))

    def export_suggestion(self) -> str:
        """`<photo>.matches.geojson` in the folder the analyst last exported to (else their home)."""
        folder = self.settings.export_dir or str(Path.home())
        stem = Path(self._result_photo or self.photo_path() or "candidates").stem
        return str(Path(folder) / f"{stem}.matches.geojson")

    def _ask_export_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export candidates", self.export_suggestion(),
                                              "GeoJSON (*.geojson)")
        if path:
            self.settings.export_dir = str(Path(path).parent)
            self.export_requested.emit(path)

    # -- results ---------------------------------------------------------------------------------
    _result_photo = ""

    def show_result(self, result: Any) -> None:
        """The footprint used and the ranked candidates of a finished Locate."""
        self._result_photo = str(getattr(result, "photo", "") or "")
        self.footprint_used.setText(result.footprint_note() if getattr(result, "footprint_m", None) else "")
        cands = list(getattr(result, "candidates", []) or [])
        table = self.candidates_table
        table.setRowCount(len(cands))
        for row, c in enumerate(cands):
            verified = getattr(c, "verified", None)
            cells = [f"{c.rank}", f"{c.score:.3f}", "✓" if verified else ("✗" if verified is False else "–"),
                     "—" if row == 0 else f"{GEOD.inv(cands[0].lon, cands[0].lat, c.lon, c.lat)[2]:,.0f} m"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.UserRole, c.rank)
                table.setItem(row, col, item)
        if cands:
            table.selectRow(0)

    def selected_rank(self) -> int:
        """The rank of the candidate selected in the table (1 when none is)."""
        rows = self.candidates_table.selectionModel().selectedRows()
        if not rows:
            return 1
        item = self.candidates_table.item(rows[0].row(), 0)
        return int(item.data(Qt.UserRole)) if item is not None else 1

    # -- state shown to the user ---------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        self.locate_button.setEnabled(not running)  # a second click must not silently restart
        self.flight_button.setEnabled(not running)
        if running:
            self.progress.setValue(0)
            self.set_status("Starting…")
            self._heartbeat.start()
        else:
            self._heartbeat.stop()

    def set_progress(self, fraction: float, message: str = "") -> None:
        if message and message != self._stage[0]:
            self._stage = (message, time.monotonic())
        super().set_progress(fraction, message)

    def set_status(self, text: str) -> None:
        self._stage = (text, time.monotonic())
        super().set_status(text)

    def _beat(self) -> None:
        """A long stage (loading the model, a big chunk of tiles) shows its elapsed seconds."""
        message, since = self._stage
        quiet = time.monotonic() - since
        if message and quiet >= QUIET_S:
            self.status.setText(f"{message} ({quiet:.0f} s)")

    def _cache_limit_changed(self, value: float) -> None:
        self.settings.cache_max_gb = float(value)

    def set_cache_text(self, text: str) -> None:
        self.cache_label.setText(text)

    def set_result_available(self, available: bool) -> None:
        self.export_button.setEnabled(available)
        self.model_panel.accept_button.setEnabled(available)

"""The dock's "Model" section: which model is active, labelling, adapting, rolling back.

Only widgets and signals (the controllers decide what happens), kept out of dock.py so the
Locate dock stays what it was and this section can be tested on its own.
"""

from __future__ import annotations

from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QComboBox, QGridLayout, QGroupBox, QLabel, QProgressBar, QPushButton, QWidget

ADAPT_TEXT = "Adapt model"
CANCEL_TEXT = "Cancel adaptation"


class ProgressStatus:
    """What a panel with a `progress` bar and a `status` label shows of a running engine job.

    Mixed into Qt widgets: a task's `progressed` signal connected to `set_progress` of one is
    queued to the main thread like any QObject method.
    """

    progress: QProgressBar
    status: QLabel

    def set_progress(self, fraction: float, message: str = "") -> None:
        self.progress.setValue(round(100 * min(max(fraction, 0.0), 1.0)))
        if message:
            self.status.setText(message)

    def set_status(self, text: str) -> None:
        self.status.setText(text)


class ModelPanel(ProgressStatus, QGroupBox):
    """Model picker, Label pairs…, This candidate is right, Adapt model (Cancel while running), Roll back."""

    model_chosen = pyqtSignal(object)  # weights path, or None for the embedded default
    label_pairs_requested = pyqtSignal()
    accept_candidate_requested = pyqtSignal()
    adapt_requested = pyqtSignal()
    cancel_adapt_requested = pyqtSignal()
    rollback_requested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.setObjectName("CdiktModelPanel")
        grid = QGridLayout(self)
        self.model_combo = QComboBox(self)
        self.model_combo.setToolTip("The model used to index and locate; adapted versions are listed newest first.")
        self.model_combo.activated.connect(self._chosen)
        grid.addWidget(self.model_combo, 0, 0, 1, 2)
        self.label_button = QPushButton("Label pairs…", self)
        self.label_button.setToolTip("Mark on the map where a few photos were taken (for Adapt model).")
        self.label_button.clicked.connect(self.label_pairs_requested)
        self.accept_button = QPushButton("This candidate is right", self)
        self.accept_button.setToolTip("Save the located photo with the candidate selected in the list above "
                                      "as a labelled pair.")
        self.accept_button.clicked.connect(self.accept_candidate_requested)
        self.accept_button.setEnabled(False)
        grid.addWidget(self.label_button, 1, 0)
        grid.addWidget(self.accept_button, 1, 1)
        self.adapt_button = QPushButton(ADAPT_TEXT, self)
        self.adapt_button.setToolTip("Fine-tune the active model on the labelled pairs of this raster; keeps the "
                                     "current model as it is and adds a new version.")
        self.adapt_button.clicked.connect(self._adapt_clicked)
        self.rollback_button = QPushButton("Roll back", self)
        self.rollback_button.setToolTip("Go back to the model the active adapted version was made from.")
        self.rollback_button.clicked.connect(self.rollback_requested)
        grid.addWidget(self.adapt_button, 2, 0)
        grid.addWidget(self.rollback_button, 2, 1)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.progress.hide()
        grid.addWidget(self.progress, 3, 0, 1, 2)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        grid.addWidget(self.status, 4, 0, 1, 2)
        self._running = False

    def set_models(self, choices: list[tuple[str, str | None]], active: str | None) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for label, path in choices:
            self.model_combo.addItem(label, path)
        idx = next((i for i, (_, p) in enumerate(choices) if p == active), 0)
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.blockSignals(False)

    def _chosen(self, index: int) -> None:
        self.model_chosen.emit(self.model_combo.itemData(index))

    def _adapt_clicked(self) -> None:
        (self.cancel_adapt_requested if self._running else self.adapt_requested).emit()

    def set_running(self, running: bool) -> None:
        self._running = running
        self.adapt_button.setText(CANCEL_TEXT if running else ADAPT_TEXT)
        self.progress.setVisible(running)
        self.progress.setValue(0)
        for w in (self.model_combo, self.rollback_button):
            w.setEnabled(not running)

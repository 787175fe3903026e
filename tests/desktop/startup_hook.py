"""Run by QGIS (PYQGIS_STARTUP) before any plugin loads: record what a user would see go wrong.

Every message-log entry is appended to a file as it arrives (so a crash later loses none of them),
and a timer closes modal dialogs (QGIS's "Couldn't load plugin" error box, a save prompt), writing
their text to the same file: a dialog would otherwise block the run until the test's time-out.
"""

import builtins
import json
import os
import time

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication, QDialog, QFileDialog, QLabel, QTextEdit

_LOG = os.environ["CDIKT_DESKTOP_LOG"]
_T0 = time.monotonic()


def _write(kind: str, **fields) -> None:
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "t": round(time.monotonic() - _T0, 3), **fields}) + "\n")


def _message(text: str, tag: str, level) -> None:
    _write("message", tag=tag, level=int(level), text=text)


def _close_modal_dialogs() -> None:
    widget = QApplication.activeModalWidget()
    # The driver answers file dialogs itself; anything else modal is unexpected: note it and close it.
    if isinstance(widget, QDialog) and not isinstance(widget, QFileDialog) and not widget.property("cdiktExpected"):
        texts = [w.text() for w in widget.findChildren(QLabel)]
        texts += [w.toPlainText() for w in widget.findChildren(QTextEdit)]
        _write("modal_dialog", title=widget.windowTitle(), cls=type(widget).__name__, text=" | ".join(texts)[:2000])
        widget.reject()


if not getattr(builtins, "_cdikt_desktop_hook", False):  # QGIS 3.22 runs PYQGIS_STARTUP twice
    builtins._cdikt_desktop_hook = True
    QgsApplication.messageLog().messageReceived.connect(_message)
    _timer = QTimer()
    _timer.setInterval(500)
    _timer.timeout.connect(_close_modal_dialogs)
    _timer.start()
    builtins._cdikt_desktop_timer = _timer
    _write("startup")

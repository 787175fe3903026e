"""Route Python ``logging`` from the plugin and the engine to the QGIS message log.

The engine logs through plain ``logging`` (it knows nothing of QGIS); without this handler its
messages would vanish inside QGIS. QgsMessageLog.logMessage is safe to call from worker
threads, so engine code running inside a QgsTask can log freely.
"""

from __future__ import annotations

import logging

from qgis.core import Qgis, QgsMessageLog

TAG = "CDIKT"
LOGGERS = ("cdikt_qgis", "model_backend")


class QgsMessageLogHandler(logging.Handler):
    """A logging handler that writes each record to the QGIS log under one tag."""

    def __init__(self, tag: str = TAG) -> None:
        super().__init__()
        self.tag = tag
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            QgsMessageLog.logMessage(msg, self.tag, _level(record.levelno))
        except Exception:  # a logging failure must never break the caller
            self.handleError(record)


def _level(levelno: int) -> Qgis.MessageLevel:
    if levelno >= logging.ERROR:
        return Qgis.Critical
    if levelno >= logging.WARNING:
        return Qgis.Warning
    return Qgis.Info


_handler: QgsMessageLogHandler | None = None


def install(level: int = logging.INFO) -> QgsMessageLogHandler:
    """Attach the handler to the plugin's and the engine's loggers; idempotent."""
    global _handler
    if _handler is None:
        _handler = QgsMessageLogHandler()
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(_handler)
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)
    return _handler


def uninstall() -> None:
    """Detach the handler so a reloaded plugin does not log every line twice."""
    global _handler
    if _handler is not None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(_handler)
        _handler = None

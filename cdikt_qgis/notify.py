"""Messages to the analyst: the message bar when there is one, logged exactly once.

QgsMessageBar already copies every message it shows into QGIS's message log ("Messages" tab),
so logging it again under our own tag showed each message twice. Details (tracebacks) go to the
CDIKT tab only. The bar items pushed for one job are remembered so the next job can clear them:
a warning about the previous photo must not sit beside the next photo's result.
"""

from __future__ import annotations

from qgis.core import Qgis, QgsMessageLog

TAG = "CDIKT"


class Notifier:
    """Push one-line messages for one controller; `clear()` removes those still on the bar."""

    def __init__(self, iface, title: str = TAG) -> None:
        self.iface = iface
        self.title = title
        self._items: list = []

    def push(self, text: str, level: Qgis.MessageLevel = Qgis.Info, duration: int = 8) -> None:
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is None:
            QgsMessageLog.logMessage(text, TAG, level)
            return
        item = bar.createMessage(self.title, text)
        self._items.append(bar.pushWidget(item, level, duration))

    def details(self, text: str, level: Qgis.MessageLevel = Qgis.Critical) -> None:
        """A traceback or other detail for the log only (the bar said what happened in one line)."""
        QgsMessageLog.logMessage(text, TAG, level)

    def clear(self) -> None:
        bar = self.iface.messageBar() if self.iface is not None else None
        items, self._items = self._items, []
        if bar is None:
            return
        for item in items:
            try:
                if item in bar.items():
                    bar.popWidget(item)
            except RuntimeError:  # already deleted by the bar (expired)
                pass

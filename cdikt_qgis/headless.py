"""Start QGIS without a display, once per process, for scripts and tests.

QgsApplication can be initialised only once in a process (exitQgis followed by a new instance
crashes), so this helper creates it on first use and hands back the same instance afterwards.
It defaults Qt to the offscreen platform so it works over SSH and in CI.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager

_app = None


def start_qgis():
    """Return the process's QgsApplication, creating and initialising it if needed."""
    global _app
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    existing = QgsApplication.instance()
    if existing is not None:
        return existing
    QgsApplication.setPrefixPath("/usr", True)
    _app = QgsApplication([], False)
    _app.initQgis()
    atexit.register(_exit_qgis)
    return _app


def _exit_qgis() -> None:
    """Tear QGIS down before Python finalises, which otherwise may crash at interpreter exit."""
    global _app
    if _app is not None:
        _app.exitQgis()
        _app = None


@contextmanager
def qgis_app() -> Iterator[object]:
    """``with qgis_app() as app:`` — a started QgsApplication; kept alive for later calls."""
    yield start_qgis()

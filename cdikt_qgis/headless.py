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
    _ensure_runtime_dir()
    from qgis.core import QgsApplication

    existing = QgsApplication.instance()
    if existing is not None:
        return existing
    QgsApplication.setPrefixPath("/usr", True)
    _app = QgsApplication([], False)
    _app.initQgis()
    atexit.register(_exit_qgis)
    return _app


def _ensure_runtime_dir() -> None:
    """Give Qt a private runtime folder when the session has none (root shells, CI, cron).

    Without XDG_RUNTIME_DIR Qt warns on stderr on every start; the warning is harmless but it is
    what a user sees of `make demo`, and a clean stderr is how scripts tell success apart.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"cdikt-runtime-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_uid == os.getuid():
        os.chmod(path, 0o700)
        os.environ["XDG_RUNTIME_DIR"] = path


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

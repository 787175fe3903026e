"""The plugin's icon, wherever the plugin was installed from (zip, `make install`, a checkout)."""

from __future__ import annotations

from pathlib import Path


def icon_path() -> str | None:
    """resources/icon.png inside the plugin (packaged) or beside it (dev checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "resources" / "icon.png", here.parent / "resources" / "icon.png"):
        if candidate.is_file():
            return str(candidate)
    return None

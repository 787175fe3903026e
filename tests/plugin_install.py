"""Install the plugin the way users do, for tests that run QGIS (or its Python) in a child process.

`make install` links a staging folder into a plugins folder; `make package` builds the release
zip, which a user installs by unzipping it there (QGIS's "Install from ZIP" does just that). The
tests use these very targets so a layout change in the Makefile is tested where it matters.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "cdikt_qgis"


def _make(*args: str) -> str:
    out = subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"make {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def make_install(plugins_dir: Path) -> Path:
    """`make install` into `plugins_dir`; returns the installed plugin folder (a link into build/)."""
    plugins_dir.mkdir(parents=True, exist_ok=True)
    _make("install", f"QGIS_PLUGINS_DIR={plugins_dir}")
    return plugins_dir / PLUGIN


def make_package() -> Path:
    """`make package`; returns the zip."""
    _make("package")
    zips = sorted((ROOT / "dist").glob(f"{PLUGIN}-*.zip"), key=lambda p: p.stat().st_mtime)
    assert zips, "make package wrote no zip"
    return zips[-1]


def install_zip(zip_path: Path, plugins_dir: Path) -> Path:
    """What "Install from ZIP" does: unpack the zip's single top-level folder into the plugins folder."""
    plugins_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        assert tops == {PLUGIN}, tops
        zf.extractall(plugins_dir)
    return plugins_dir / PLUGIN

"""`make demo`'s script as a new user meets it: a bare environment, a verified footprint, a clean stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .qgis_helpers import ROOT


def test_demo_locates_the_sample_and_prints_no_library_warning(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"  # no `proj` executable to find PROJ's data by, as on a fresh machine
    empty_bin.mkdir()
    env = {"PATH": str(empty_bin), "HOME": str(tmp_path / "home"), "DEMO_OUT": str(tmp_path / "demo"),
           "CDIKT_CACHE_DIR": str(tmp_path / "cache"), "GDAL_PAM_ENABLED": "NO"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no PROJ, Qt runtime-folder, rasterio or torch warning
    line = next(json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{"))
    assert line["verified"] is True and line["candidates"] == 5
    assert "within one footprint" in proc.stdout
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000

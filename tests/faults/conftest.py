"""The fault tier: what a hostile week does to the engine (kills, corruption, full disks, two
processes at once, malformed input), done for real on a small raster.

Every case asserts the state afterwards: one line for the user and no traceback, no wrong answer,
nothing lost. Runs that load the model go through the command line in a subprocess, as a script
or a second QGIS would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
RASTER = DATA / "manila_oam_0.10m.tif"
FOOTPRINT = 40.0


def run_cli(*args: object, cache: Path, timeout: float = 240, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    full = {**os.environ, "CDIKT_CACHE_DIR": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "model_backend", *map(str, args)], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def one_line_error(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """Status 2, one line on stderr naming the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nadir view rendered from the raster (its truth is known, so a wrong answer shows)."""
    from model_backend.learn.datasets.synth import make_views, render_view, save_view

    d = tmp_path_factory.mktemp("fault_photo")
    drawn = make_views(str(RASTER), 1, FOOTPRINT, 0, max_tilt_deg=0.0, photometric=False, scale_range=(1.0, 1.0))[0]
    view = render_view(str(RASTER), replace(drawn.spec, heading_deg=0.0, tilt_deg=0.0, tilt_azimuth_deg=0.0))
    path = d / "DJI_0001.JPG"
    save_view(view, str(path))
    return path

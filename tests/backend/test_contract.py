"""docs/CONTRACT.md is true: every name it promises is importable from `model_backend`, lazily."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import model_backend

ROOT = Path(__file__).resolve().parents[2]


def test_every_name_of_the_contract_is_importable_from_the_package() -> None:
    text = (ROOT / "docs" / "CONTRACT.md").read_text()
    promised = {n.strip() for line in re.findall(r"^from model_backend import ([^#\n]+)", text, re.M)
                for n in line.split(",")}
    assert len(promised) >= 20
    assert promised <= set(model_backend.__all__)
    for name in promised:
        assert getattr(model_backend, name) is not None, name


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, model_backend; model_backend.read_labels; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

"""The plugin loads cheaply, builds its GUI, and unload() leaves nothing behind."""

from __future__ import annotations

import os

from .qgis_helpers import process_events


def test_class_factory_without_iface_supports_processing_only(qgis_app) -> None:
    """qgis_process calls classFactory(None) then initProcessing(); neither may touch iface."""
    import cdikt_qgis
    from cdikt_qgis.plugin import CdiktPlugin

    plugin = cdikt_qgis.classFactory(None)
    assert isinstance(plugin, CdiktPlugin), getattr(plugin, "error", "")
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    plugin.initProcessing()
    plugin.initProcessing()  # idempotent: QGIS calls it, and initGui calls it again
    try:
        assert plugin.provider is not None and registry.providerById("cdikt") is plugin.provider
        assert sorted(a.id() for a in plugin.provider.algorithms()) == ["cdikt:adapt", "cdikt:index", "cdikt:locate",
                                                                     "cdikt:locate_flight"]
    finally:
        plugin.unload()
    assert registry.providerById("cdikt") is None


def test_init_gui_adds_button_menu_and_dock_then_unload_removes_all(iface) -> None:
    import cdikt_qgis

    plugin = cdikt_qgis.classFactory(iface)
    plugin.initGui()
    assert [a.text() for a in iface.toolbar_actions()] == ["Locate drone image"]
    assert "&CDIKT" in iface.raster_menu_titles()
    assert not plugin.action.icon().isNull()
    assert iface.docks() == []  # the dock is built on first use, not at start-up

    plugin.action.trigger()
    docks = iface.docks()
    assert len(docks) == 1 and docks[0].windowTitle() == "Locate drone image"
    assert not docks[0].isHidden()
    plugin.action.trigger()  # a second click reuses the dock
    assert len(iface.docks()) == 1

    plugin.unload()
    process_events()
    assert iface.toolbar_actions() == []
    assert "&CDIKT" not in iface.raster_menu_titles()
    assert iface.docks() == []
    assert plugin.action is None and plugin.dock is None and plugin.controller is None


def test_dock_preselects_the_active_raster_layer(iface) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    import cdikt_qgis

    from .qgis_helpers import DATA

    a = QgsRasterLayer(str(DATA / "colorado_hro_0.15m_nodata.tif"), "colorado")
    b = QgsRasterLayer(str(DATA / "manila_oam_0.10m.tif"), "manila")
    QgsProject.instance().addMapLayers([a, b])
    iface.setActiveLayer(b)
    plugin = cdikt_qgis.classFactory(iface)
    plugin.initGui()
    plugin.show_dock()
    assert plugin.dock.layer_combo.currentLayer() is b
    plugin.unload()


def test_broken_start_still_loads_and_shows_the_error(iface) -> None:
    """A failure inside classFactory yields a stand-in plugin that reports it (QuickMapServices pattern)."""
    from cdikt_qgis import _BrokenPlugin

    broken = _BrokenPlugin(iface, "Traceback (most recent call last):\nImportError: no module named xyz\n")
    broken.initGui()
    broken.initProcessing()
    (title, text, level), = iface.messages()
    assert title == "CDIKT" and "ImportError: no module named xyz" in text
    broken.unload()


def test_site_packages_candidates_follow_settings_then_env(iface, monkeypatch, tmp_path) -> None:
    from cdikt_qgis import bootstrap
    from cdikt_qgis.settings import CdiktSettings

    configured, env = tmp_path / "configured", tmp_path / "env"
    CdiktSettings().python_site_packages = str(configured)
    monkeypatch.setenv("CDIKT_SITE_PACKAGES", str(env))
    found = bootstrap.site_packages_candidates()
    assert found[:2] == [str(configured), str(env)]
    # dev layout: the repo's own venv comes after the explicit choices
    assert any(p.endswith("site-packages") and "/.venv/" in p for p in found[2:])


def test_dev_install_layout_finds_engine_and_venv_torch_from_qgis_python(tmp_path) -> None:
    """As after `make install`: QGIS's own Python (no torch), the plugin reached through links.

    Only `model_backend` may become a new top-level name: the plugin folder on sys.path once hid
    QGIS's own `processing` (and exposed `settings`, `log`, `tasks`... to every other plugin).
    """
    import json
    import subprocess
    from pathlib import Path

    import pytest

    from .qgis_helpers import ROOT

    venv_sp = sorted((ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    system_python = Path("/usr/bin/python3")
    if not venv_sp or not system_python.exists():
        pytest.skip("needs the repo's .venv and the system Python QGIS uses")
    from ..plugin_install import make_install

    plugins = tmp_path / "profile" / "python" / "plugins"
    make_install(plugins)
    ours = sorted(p.stem for p in (ROOT / "cdikt_qgis").iterdir() if p.name != "__pycache__")
    script = f"""
import importlib.util, json, os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
sys.path = [p for p in sys.path if os.path.realpath(p) != {str(ROOT)!r}]
sys.path.insert(0, {str(plugins)!r})
sys.path.append("/usr/share/qgis/python/plugins")  # where QGIS keeps processing, grassprovider...
from qgis.core import QgsApplication
QgsApplication.setPrefixPath("/usr", True)
app = QgsApplication([], False); app.initQgis()
assert importlib.util.find_spec("torch") is None, "system python unexpectedly has torch"
before = list(sys.path)
import cdikt_qgis
plugin = cdikt_qgis.classFactory(None)
import torchvision  # torch's own deps must resolve from the env, not older Debian copies
import model_backend.nn.embedder
import model_backend.core.paths
print(json.dumps(dict(
    plugin=type(plugin).__name__, error=getattr(plugin, "error", ""),
    torch=importlib.util.find_spec("torch") is not None,
    engine=os.path.realpath(model_backend.nn.embedder.__file__),
    resources=str(model_backend.core.paths.resources_dir()),
    added=[p for p in sys.path if p not in before],
    processing=importlib.util.find_spec("processing").origin,
    shadowed=[n for n in {ours!r} if n not in ("processing",) and importlib.util.find_spec(n) is not None],
    triton_blocked="triton" in sys.modules and sys.modules["triton"] is None,
)))
app.exitQgis()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CDIKT_SITE_PACKAGES")}
    env["HOME"] = str(tmp_path)  # fresh QGIS settings: no cdikt/python_site_packages
    out = subprocess.run([str(system_python), "-c", script], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plugin"] == "CdiktPlugin", got["error"]
    assert got["torch"] is True
    assert got["engine"] == str(ROOT / "model_backend" / "nn" / "embedder.py")
    assert got["resources"] == str(ROOT / "resources")
    libs = str(plugins / "cdikt_qgis" / "libs")
    assert got["added"][0] == libs and sorted(os.listdir(libs)) == ["model_backend"]
    assert all(p == libs or "/.venv/" in p for p in got["added"]), got["added"]
    assert got["processing"].startswith("/usr/share/qgis/python/plugins/processing/"), got["processing"]
    assert got["shadowed"] == []
    assert got["triton_blocked"] is True


def test_block_triton_keeps_find_spec_honest() -> None:
    """torch asks importlib.util.find_spec("triton") at CUDA init: it must answer None, not raise."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; from cdikt_qgis import bootstrap; assert bootstrap.block_triton(); "
            "assert importlib.util.find_spec('triton') is None\n"
            "try:\n    import triton\nexcept ImportError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CDIKT_ALLOW_TRITON": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "blocked"
    check = "from cdikt_qgis import bootstrap; print(bootstrap.block_triton())"
    opt_out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CDIKT_ALLOW_TRITON": "1"})
    assert opt_out.stdout.strip() == "False", opt_out.stderr

"""Typed settings over QgsSettings, and logging routed to the QGIS message log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest


def test_settings_defaults_and_round_trip(qgis_app, tmp_path: Path) -> None:
    from cdikt_qgis.settings import CdiktSettings

    s = CdiktSettings()
    assert s.cache_dir is None and s.weights_path is None and s.python_site_packages is None
    assert s.default_footprint_m == 60.0 and s.top_k == 5 and s.footprint_from_exif is True
    assert s.cache_max_gb == 20.0 and s.cache_max_bytes() == 20 * 2**30
    from model_backend.core.config import QueryConfig  # the dock's default tolerance is the engine's

    assert s.footprint_tolerance_pct == 100 * QueryConfig().footprint_tolerance
    assert s.effective_cache_dir() == str(tmp_path / "cache")  # CDIKT_CACHE_DIR, as the engine does

    s.cache_dir = tmp_path / "mine"
    s.weights_path = tmp_path / "w.safetensors"
    s.default_footprint_m = 120
    s.top_k = 7
    s.footprint_from_exif = False
    s.cache_max_gb = 0
    s.footprint_tolerance_pct = 0
    again = CdiktSettings()  # a fresh object reads the stored values
    assert again.cache_dir == str(tmp_path / "mine")
    assert again.results_dir() == str(tmp_path / "mine" / "results")
    assert again.weights_path == str(tmp_path / "w.safetensors")
    assert (again.default_footprint_m, again.top_k, again.footprint_from_exif) == (120.0, 7, False)
    assert again.cache_max_gb == 0.0 and again.cache_max_bytes() is None  # 0: no limit
    assert again.footprint_tolerance_pct == 0.0  # 0 is a choice (the size typed only), not "unset"
    again.cache_dir = None
    assert CdiktSettings().cache_dir is None


def test_settings_refuse_bad_values(qgis_app) -> None:
    from cdikt_qgis.settings import PLUGIN_DIR, CdiktSettings

    s = CdiktSettings()
    with pytest.raises(ValueError, match="inside the plugin folder"):
        s.cache_dir = PLUGIN_DIR / "cache"
    with pytest.raises(ValueError):
        s.top_k = 0
    with pytest.raises(ValueError):
        s.default_footprint_m = -1
    with pytest.raises(ValueError):
        s.cache_max_gb = -1
    with pytest.raises(ValueError):
        s.footprint_tolerance_pct = 150


def test_engine_logging_reaches_the_qgis_log(qgis_app) -> None:
    from qgis.core import Qgis, QgsApplication

    from cdikt_qgis import log as cdikt_log

    seen: list[tuple[str, str, int]] = []

    def record(message: str, tag: str, level) -> None:
        seen.append((message, tag, int(level)))

    QgsApplication.messageLog().messageReceived.connect(record)
    try:
        cdikt_log.install()
        cdikt_log.install()  # idempotent: one handler, not two
        logging.getLogger("model_backend.index.build").warning("index half done")
        logging.getLogger("cdikt_qgis.tasks").info("task queued")
        cdikt_log.uninstall()
        logging.getLogger("model_backend").warning("after uninstall")
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(record)
    ours = [s for s in seen if s[1] == "CDIKT"]
    assert ours == [("model_backend.index.build: index half done", "CDIKT", int(Qgis.Warning)),
                    ("cdikt_qgis.tasks: task queued", "CDIKT", int(Qgis.Info))]


def test_qgis_app_helper_reuses_the_running_application(qgis_app) -> None:
    from qgis.core import QgsApplication

    from cdikt_qgis.headless import qgis_app as qgis_app_ctx

    with qgis_app_ctx() as app:
        assert app is QgsApplication.instance()
        assert QgsApplication.prefixPath()  # initialised, not just constructed


def test_the_cpu_runtime_chosen_and_its_measured_figures_reach_the_qgis_log(qgis_app) -> None:
    """What `auto` measured on this machine is visible where the analyst looks: the CDIKT log tab."""
    from qgis.core import QgsApplication

    from cdikt_qgis import log as cdikt_log
    from model_backend.nn.embedder import EmbeddingModel

    seen: list[str] = []

    def record(message: str, tag: str, level) -> None:
        if tag == "CDIKT":
            seen.append(message)

    QgsApplication.messageLog().messageReceived.connect(record)
    try:
        cdikt_log.install()
        net = EmbeddingModel.load(device="cpu", runtime="auto")
    finally:
        cdikt_log.uninstall()
        QgsApplication.messageLog().messageReceived.disconnect(record)
    lines = [m for m in seen if "CPU runtime:" in m]
    assert lines and "fastest measured on this machine" in lines[-1] and "tiles/s" in lines[-1]
    assert lines[-1].split("CPU runtime: ")[1].startswith(
        {"openvino": "openvino", "onnxruntime": "onnxruntime", "torch": "PyTorch"}[net.runtime])

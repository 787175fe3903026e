"""End to end through the plugin: dock -> controller -> LocateTask (task manager) -> engine -> layers.

Runs the real engine on the bundled Manila orthophoto (2048 px at 0.1 m, 25 tiles of 60 m),
with a photo rendered from the raster by the engine's own view simulator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
locate = pytest.importorskip("model_backend.locate.pipeline")

from model_backend.core.requests import Status

from .qgis_helpers import DATA, wait_until

RASTER = DATA / "manila_oam_0.10m.tif"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from model_backend.geo.raster import open_raster
    from model_backend.learn.datasets.synth import ViewSpec, render_view, save_view

    info = open_raster(RASTER)
    cx, cy = info.affine * (info.width * 0.4, info.height * 0.55)
    view = render_view(info.path, ViewSpec(cx, cy, 60.0, heading_deg=35.0))
    path = tmp_path_factory.mktemp("photo") / "view_0001.jpg"
    save_view(view, str(path))
    return {"path": str(path), "cx": cx, "cy": cy}


@pytest.fixture
def plugin(iface):
    from qgis.core import QgsProject, QgsRasterLayer

    import cdikt_qgis

    layer = QgsRasterLayer(str(RASTER), "manila")
    QgsProject.instance().addMapLayer(layer)
    iface.setActiveLayer(layer)
    p = cdikt_qgis.classFactory(iface)
    p.initGui()
    p.show_dock()
    p.raster = layer
    yield p
    p.unload()


def _fill(dock, photo: str, footprint: float = 60.0, top_k: int = 4) -> None:
    dock.set_photo(photo)
    dock.footprint_spin.setValue(footprint)
    dock.footprint_auto.setChecked(False)
    dock.top_k_spin.setValue(top_k)


def _done(task) -> bool:
    from cdikt_qgis.engine_task import LIVE_TASKS

    return task not in LIVE_TASKS


def _groups() -> list:
    from qgis.core import QgsLayerTree, QgsProject

    return [n for n in QgsProject.instance().layerTreeRoot().children() if QgsLayerTree.isGroup(n)]


def _start(plugin):
    plugin.dock.locate_button.click()
    task = plugin.controller.task
    assert task is not None, plugin.dock.status.text()
    return task


def test_locate_adds_styled_layers_and_exports_geojson(plugin, iface, photo, tmp_path: Path) -> None:
    from qgis.core import QgsProject, QgsRasterLayer, QgsSingleBandPseudoColorRenderer, QgsVectorLayer

    from model_backend.locate.export import geojson_problems

    dock = plugin.dock
    stale = tmp_path / "cache" / "indexes" / "feedfacefeedfacefeedface"  # an index of last year's raster
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text('{"n_tiles": 1}')
    (stale / "embeddings.npy").write_bytes(b"\0" * 4096)
    for f in (stale / "embeddings.npy", stale / "manifest.json", stale):
        os.utime(f, (1e9, 1e9))
    plugin.controller.settings.cache_max_gb = 1e-6  # a limit only the index in use exceeds
    _fill(dock, photo["path"], top_k=4)
    task = _start(plugin)
    assert dock.cancel_button.isEnabled()
    assert wait_until(lambda: _done(task), 90), dock.status.text()
    assert task.outcome.succeeded, task.message + task.details
    assert not stale.exists() and task.cache.removed == 1  # pruned to the limit after the Locate ...
    assert Path(task.result.heatmap_path).is_file()  # ... keeping the indexes just used and the results:
    assert len(task.result.index_dirs) == 3  # every size searched around the footprint typed (±30 %)
    assert all((Path(d) / "manifest.json").is_file() for d in task.result.index_dirs)
    assert "1 old index removed" in dock.cache_label.text() and " GB of " in dock.cache_label.text()

    group = QgsProject.instance().layerTreeRoot().children()[0]
    assert group.name() == "view_0001.jpg"
    layers = [node.layer() for node in group.findLayers()]
    cands, heat = layers[0], layers[-1]
    assert isinstance(heat, QgsRasterLayer) and isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer)
    best = task.result.candidates[0]
    if best.verified:  # the photo is draped on the map between the candidates and the heatmap
        assert len(layers) == 3 and layers[1].name() == "Photo (draped)" and layers[1].crs() == plugin.raster.crs()
    else:
        assert len(layers) == 2
    assert isinstance(cands, QgsVectorLayer) and cands.featureCount() == 4
    assert heat.crs() == plugin.raster.crs() and cands.crs() == plugin.raster.crs()
    assert sorted(f["rank"] for f in cands.getFeatures()) == [1, 2, 3, 4]
    assert dock.export_button.isEnabled() and not dock.cancel_button.isEnabled()
    assert dock.progress.value() == 100 and "4 candidates" in dock.status.text()
    assert not [m for m in iface.messages() if m[2] >= 1]  # no warning or error

    out = plugin.controller.export(str(tmp_path / "report" / "matches.geojson"))
    doc = json.loads(Path(out).read_text())
    assert geojson_problems(doc) == [] and len(doc["features"]) == 4
    best = doc["features"][0]["properties"]
    assert best["rank"] == 1 and -180 <= best["lon"] <= 180 and -90 <= best["lat"] <= 90
    # outputs went beside the cache, never into the plugin folder
    assert Path(task.result.heatmap_path).is_relative_to(tmp_path / "cache" / "results")


def test_cancel_leaves_no_finished_looking_index_and_says_cancelled(plugin, iface, photo, tmp_path) -> None:
    from qgis.core import QgsTask

    from cdikt_qgis.settings import CdiktSettings

    cache = tmp_path / "chosen-cache"
    CdiktSettings().cache_dir = cache  # the engine must get the cache from the settings
    _fill(plugin.dock, photo["path"])
    task = _start(plugin)
    assert wait_until(lambda: task.status() == QgsTask.Running or _done(task), 30)
    plugin.dock.cancel_button.click()
    assert wait_until(lambda: _done(task), 60)
    assert task.outcome.status is Status.CANCELLED
    # a clean end for QGIS too: a terminated task would be announced as "Task failed"
    assert task.status() == QgsTask.Complete and task.description().endswith("(cancelled)")
    assert plugin.dock.status.text() == "Cancelled"
    assert not plugin.dock.cancel_button.isEnabled()
    assert list(cache.glob("indexes/*/manifest.json")) == []
    assert _groups() == []
    assert not (tmp_path / "cache" / "indexes").exists()


def test_locate_is_disabled_while_running_and_a_scripted_request_supersedes(plugin, photo) -> None:
    """A second click cannot silently restart (the button is off); a script calling the controller
    supersedes the running request, and only the newest result is shown."""

    _fill(plugin.dock, photo["path"], top_k=2)
    first = _start(plugin)
    assert not plugin.dock.locate_button.isEnabled()
    plugin.dock.locate_button.click()
    assert plugin.controller.task is first  # the disabled button did nothing
    plugin.dock.top_k_spin.setValue(3)
    second = plugin.controller.locate(plugin.dock.params())
    assert first is not second and first.isCanceled()
    assert wait_until(lambda: _done(first) and _done(second), 90)
    assert first.outcome.status is Status.CANCELLED and second.outcome.succeeded, second.message
    groups = _groups()
    assert len(groups) == 1
    assert groups[0].findLayers()[0].layer().featureCount() == 3
    assert plugin.controller.last_result is second.result
    assert plugin.dock.locate_button.isEnabled()


def test_the_dock_shows_the_footprint_used_and_lists_candidates_to_accept(plugin, iface, photo, data_dir) -> None:
    """With the auto footprint the scale search picks the size: the dock says which and why, lists every
    candidate, and any of them (not only #1) can be saved as a labelled pair."""
    from cdikt_qgis.labelling.store import LabelStore

    dock = plugin.dock
    _fill(dock, photo["path"], footprint=60.0, top_k=3)
    dock.footprint_auto.setChecked(True)
    task = _start(plugin)
    assert wait_until(lambda: _done(task), 120), dock.status.text()
    result = task.result
    assert result.footprint_source == "scale search"
    assert dock.footprint_used.text() == f"{result.footprint_m:g} m (scale search)"
    assert f"footprint {result.footprint_m:g} m (scale search)" in dock.status.text()
    table = dock.candidates_table
    assert table.rowCount() == 3
    assert [table.item(r, 0).text() for r in range(3)] == ["1", "2", "3"]
    assert table.item(1, 1).text() == f"{result.candidates[1].score:.3f}" and table.item(0, 3).text() == "—"
    assert table.item(1, 3).text().endswith(" m") and dock.selected_rank() == 1
    table.selectRow(2)
    assert dock.selected_rank() == 3
    dock.model_panel.accept_button.click()
    store = plugin.labelling.store()
    assert isinstance(store, LabelStore) and len(store) == 1
    from pyproj import CRS, Transformer

    from model_backend.learn.labels import ring_centre

    label_set = store.labels
    to_store = Transformer.from_crs(CRS.from_epsg(4326), CRS.from_wkt(label_set.crs_wkt), always_xy=True)
    cx, cy = ring_centre(label_set.labels[0].ring)

    def off(c) -> float:
        x, y = to_store.transform(c.lon, c.lat)
        return abs(x - cx) + abs(y - cy)

    assert off(result.candidates[2]) < off(result.candidates[0])  # the saved footprint is #3's, not #1's


def test_unload_cancels_a_running_task(iface, plugin, photo, tmp_path: Path) -> None:
    from qgis.core import QgsTask


    _fill(plugin.dock, photo["path"])
    task = _start(plugin)
    assert wait_until(lambda: task.status() == QgsTask.Running or _done(task), 30)
    plugin.unload()
    assert task.isCanceled() or task.status() == QgsTask.Terminated
    assert wait_until(lambda: _done(task), 60)
    assert task.outcome.status is Status.CANCELLED
    assert _groups() == []
    assert list((tmp_path / "cache").glob("indexes/*/manifest.json")) == []
    assert iface.docks() == [] and iface.toolbar_actions() == []


def test_engine_input_error_becomes_a_one_line_warning(plugin, iface, photo) -> None:
    from qgis.core import Qgis

    _fill(plugin.dock, photo["path"], footprint=4000.0)  # larger than the 205 m raster
    task = _start(plugin)
    assert wait_until(lambda: _done(task), 60)
    title, text, level = iface.messages()[-1]
    assert level == int(Qgis.Warning) and "larger than the raster" in text and "\n" not in text
    assert plugin.dock.status.text() == text


def _request(plugin, photo: str, out_dir: str):
    from cdikt_qgis.tasks import LocateParams, capture_raster, locate_request

    params = LocateParams(layer=plugin.raster, photo=photo, footprint_m=60.0, footprint_auto=False, top_k=3)
    return locate_request(params, capture_raster(plugin.raster), out_dir, plugin.controller.settings)


def test_a_bug_is_critical_with_the_traceback_in_the_log(plugin, iface, photo, tmp_path: Path) -> None:
    from qgis.core import Qgis, QgsApplication

    from cdikt_qgis.tasks import LocateTask
    from model_backend.core.requests import Failure

    logged: list[str] = []
    QgsApplication.messageLog().messageReceived.connect(lambda msg, tag, level: logged.append(msg))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    task = LocateTask(99, _request(plugin, photo["path"], str(blocker / "out")), plugin.controller._finished)
    plugin.controller.request = 99
    assert task.run() is False
    assert task.outcome.failure is Failure.BUG
    task.finished(False)
    title, text, level = iface.messages()[-1]
    assert level == int(Qgis.Critical) and text.startswith("Unexpected error:")
    assert any("Traceback (most recent call last)" in m for m in logged)


def test_missing_torch_says_how_to_install(plugin, iface, photo, tmp_path: Path) -> None:
    from qgis.core import Qgis

    from cdikt_qgis.tasks import LocateTask
    from model_backend.core.requests import Failure

    class NoTorch(LocateTask):
        def work(self):
            err = ImportError("No module named 'torch'")
            err.name = "torch"
            raise err

    task = NoTorch(7, _request(plugin, photo["path"], str(tmp_path / "out")), plugin.controller._finished)
    plugin.controller.request = 7
    assert task.run() is False
    assert task.outcome.failure is Failure.MISSING_DEPENDENCY
    task.finished(False)
    title, text, level = iface.messages()[-1]
    assert level == int(Qgis.Critical) and "make setup" in text and "cdikt/python_site_packages" in text


def test_locate_flight_from_the_dock_adds_track_and_photos_and_resumes(plugin, iface, tmp_path: Path) -> None:
    """Flight folder + "Locate flight": a track layer and flag-coloured photo points; run again, it resumes."""
    from qgis.core import QgsProject, QgsVectorLayer, QgsWkbTypes

    from model_backend.learn.datasets.flights import FlightPlan, simulate_flight

    truth = simulate_flight(RASTER, FlightPlan("lawnmower", 6, 40.0), 3, tmp_path / "flight")
    dock = plugin.dock
    dock.footprint_spin.setValue(40.0)
    dock.footprint_auto.setChecked(False)
    dock.verify_check.setChecked(False)
    dock.flight_widget.setFilePath(str(tmp_path / "flight"))
    assert dock.speed_spin.value() == 20.0 and dock.motion_check.isChecked()  # the engine's defaults
    dock.speed_spin.setValue(15.0)
    dock.motion_check.setChecked(False)
    dock.flight_button.click()
    task = plugin.controller.task
    assert task is not None, dock.status.text()
    assert task.request.max_speed_m_s == 15.0 and task.request.motion is False and task.request.log is None
    assert not dock.flight_button.isEnabled() and dock.cancel_button.isEnabled()
    assert wait_until(lambda: _done(task), 120), dock.status.text()
    assert task.outcome.succeeded, task.message + task.details
    group = QgsProject.instance().layerTreeRoot().children()[0]
    assert group.name().startswith("Flight flight")
    photos, track = (node.layer() for node in group.findLayers())
    assert isinstance(track, QgsVectorLayer) and track.geometryType() == QgsWkbTypes.LineGeometry
    assert photos.featureCount() == 6 and photos.crs() == plugin.raster.crs()
    assert "6 photos as one track (ordered by time)" in dock.status.text()
    assert Path(task.result.csv_path).is_relative_to(tmp_path / "cache" / "results")
    assert len(truth) == 6

    dock.motion_check.setChecked(True)  # the decoding's options change; every located photo is still reused
    dock.flight_log_widget.setFilePath(str(Path(__file__).parents[1] / "data" / "uavvisloc" / "03.csv"))
    dock.flight_button.click()  # the same flight again: every photo reused
    again = plugin.controller.task
    assert again.request.motion is True and again.request.log.endswith("03.csv")
    assert wait_until(lambda: _done(again), 60) and again.outcome.succeeded
    assert again.result.reused == 6 and "6 reused" in dock.status.text()
    dock.flight_widget.setFilePath(str(tmp_path / "nowhere"))
    dock.flight_button.click()
    assert "Flight folder not found" in dock.status.text()

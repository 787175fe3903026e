"""The dock collects inputs into parameters; the controller refuses bad inputs with clear messages."""

from __future__ import annotations

from pathlib import Path

from .qgis_helpers import DATA, wait_until


def _dock_and_controller(iface):
    from cdikt_qgis.dock import LocateDock
    from cdikt_qgis.plugin import LocateController

    dock = LocateDock(parent=iface.mainWindow())
    return dock, LocateController(iface, dock)


def test_dock_builds_params_from_its_widgets(iface) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    from cdikt_qgis.settings import CdiktSettings
    from cdikt_qgis.tasks import LocateParams

    CdiktSettings().top_k = 3
    layer = QgsRasterLayer(str(DATA / "manila_oam_0.10m.tif"), "manila")
    QgsProject.instance().addMapLayer(layer)
    dock, _ = _dock_and_controller(iface)
    assert dock.top_k_spin.value() == 3  # defaults come from settings
    assert not dock.export_button.isEnabled() and not dock.cancel_button.isEnabled()
    dock.set_layer(layer)
    dock.set_photo(str(DATA / "DJI_0061.JPG"))
    dock.footprint_spin.setValue(80)
    dock.footprint_auto.setChecked(False)
    assert dock.tolerance_spin.value() == 30  # the engine's default tolerance, from settings
    dock.tolerance_spin.setValue(20)
    seen: list[LocateParams] = []
    dock.locate_requested.disconnect()
    dock.locate_requested.connect(seen.append)
    dock.locate_button.click()
    assert seen == [LocateParams(layer=layer, photo=str(DATA / "DJI_0061.JPG"), footprint_m=80.0,
                                 footprint_auto=False, top_k=3, tolerance_pct=20.0)]


def test_thumbnail_follows_exif_orientation(iface, tmp_path: Path) -> None:
    from PIL import Image

    from cdikt_qgis.dock import load_thumbnail

    landscape = load_thumbnail(str(DATA / "DJI_0061.JPG"))  # 2400 x 1800, orientation 1
    assert landscape.width() > landscape.height()
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, to be shown rotated 90° clockwise: portrait
    Image.new("RGB", (300, 200), "red").save(rotated, exif=exif.tobytes())
    portrait = load_thumbnail(str(rotated))
    assert portrait.height() > portrait.width()
    assert load_thumbnail(str(tmp_path / "missing.jpg")).isNull()


def test_a_web_layer_is_refused_with_a_clear_message(iface) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    xyz = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0",
                         "OSM tiles", "wms")
    assert xyz.isValid()
    QgsProject.instance().addMapLayer(xyz)
    dock, controller = _dock_and_controller(iface)
    dock.layer_combo.setLayer(xyz)
    dock.set_photo(str(DATA / "DJI_0061.JPG"))
    dock.locate_button.click()
    assert controller.task is None
    (title, text, _), = iface.messages()
    assert title == "CDIKT" and "'OSM tiles' is a web layer (WMS/WMTS/XYZ)" in text and "GeoTIFF" in text
    assert len(text) <= 100  # one line that fits the message bar
    assert dock.status.text() == text


def test_a_missing_photo_is_refused_with_a_clear_message(iface, tmp_path: Path) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(DATA / "manila_oam_0.10m.tif"), "manila")
    QgsProject.instance().addMapLayer(layer)
    dock, controller = _dock_and_controller(iface)
    dock.set_layer(layer)
    dock.locate_button.click()
    assert [m[1] for m in iface.messages()] == ["Pick the drone photo to locate."]
    dock.set_photo(str(tmp_path / "nope.jpg"))
    dock.locate_button.click()
    assert controller.task is None
    # the previous request's message is stale now: only the new one stays on the bar
    assert [m[1] for m in iface.messages()] == [f"Photo not found: {tmp_path / 'nope.jpg'}"]
    assert dock.status.text() == f"Photo not found: {tmp_path / 'nope.jpg'}"


def test_export_without_a_result_says_so(iface, tmp_path: Path) -> None:
    dock, controller = _dock_and_controller(iface)
    assert controller.export(str(tmp_path / "x.geojson")) is None
    assert "run Locate first" in iface.messages()[-1][1]
    assert not (tmp_path / "x.geojson").exists()


def test_locate_remembers_the_last_footprint_and_top_k(iface, tmp_path: Path) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    from cdikt_qgis.engine_task import LIVE_TASKS
    from cdikt_qgis.settings import CdiktSettings
    from cdikt_qgis.tasks import LocateParams

    layer = QgsRasterLayer(str(DATA / "colorado_hro_0.15m_nodata.tif"), "colorado")
    QgsProject.instance().addMapLayer(layer)
    dock, controller = _dock_and_controller(iface)
    # a real photo but a footprint the engine refuses: the task fails fast, the choice is still kept
    task = controller.locate(LocateParams(layer, str(DATA / "DJI_0061.JPG"), 4321.0, False, 9))
    controller.cancel()
    assert wait_until(lambda: task not in LIVE_TASKS, 60)  # no task outlives the test
    s = CdiktSettings()
    assert (s.default_footprint_m, s.footprint_from_exif, s.top_k) == (4321.0, False, 9)


def test_the_dock_scrolls_and_suggests_an_export_name_in_the_last_folder(iface, tmp_path: Path) -> None:
    from qgis.PyQt.QtWidgets import QScrollArea

    from cdikt_qgis.settings import CdiktSettings

    dock, _ = _dock_and_controller(iface)
    assert isinstance(dock.widget(), QScrollArea) and dock.widget().widgetResizable()
    assert dock.export_suggestion() == str(Path.home() / "candidates.matches.geojson")
    dock.set_photo(str(DATA / "DJI_0061.JPG"))
    CdiktSettings().export_dir = str(tmp_path / "exports")
    assert dock.export_suggestion() == str(tmp_path / "exports" / "DJI_0061.matches.geojson")


def test_a_quiet_stage_shows_its_elapsed_time(iface) -> None:
    """Loading the model can take ten seconds with no progress from the engine: the dock still moves."""
    import time

    from .qgis_helpers import wait_until

    dock, _ = _dock_and_controller(iface)
    dock.set_running(True)
    dock.set_progress(0.0, "Loading model…")
    t0 = time.monotonic()
    assert wait_until(lambda: dock.status.text().startswith("Loading model… ("), 5)
    assert time.monotonic() - t0 <= 2.5
    assert dock.status.text().endswith(" s)")
    dock.set_progress(0.3, "Embedding tiles 100 of 300")
    assert dock.status.text() == "Embedding tiles 100 of 300"  # a new stage shows at once, without a count
    dock.set_running(False)
    assert not dock._heartbeat.isActive()

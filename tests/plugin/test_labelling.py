"""Labelling on a real canvas: map-tool clicks make labels in the raster's CRS, every edit is saved,
labels survive a plugin reload, a Locate candidate can be accepted, a failed save loses nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .qgis_helpers import DATA, process_events

RASTER = DATA / "naip_northdakota_5m_2015.tif"


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "flight"
    folder.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (120, 90), colour).save(folder / f"DJI_{i:04d}.JPG")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def _canvas_on_raster(iface, crs_id: str):
    """The real canvas showing the raster, drawn in `crs_id` (the project's CRS, not the raster's)."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(RASTER), "naip 2015")
    assert layer.isValid()
    project = QgsProject.instance()
    project.addMapLayer(layer)
    crs = QgsCoordinateReferenceSystem(crs_id)
    project.setCrs(crs)
    canvas = iface.mapCanvas()
    iface.mainWindow().show()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(crs)
    extent = QgsCoordinateTransform(layer.crs(), crs, project).transformBoundingBox(layer.extent())
    canvas.setExtent(extent)
    process_events()
    return canvas, layer


def _click(canvas, tool, x: int, y: int, shift: bool = False):
    """A real QgsMapMouseEvent (button release) at widget pixel (x, y), as a user's click delivers it."""
    from qgis.gui import QgsMapMouseEvent
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt

    mods = Qt.ShiftModifier if shift else Qt.NoModifier
    event = QgsMapMouseEvent(canvas, QEvent.MouseButtonRelease, QPoint(x, y), Qt.LeftButton, Qt.LeftButton, mods)
    assert canvas.mapTool() is tool
    tool.canvasReleaseEvent(event)
    return event.mapPoint()


@pytest.mark.parametrize("canvas_crs", ["EPSG:3857", "EPSG:26914"])
def test_map_clicks_make_labels_in_the_raster_crs(iface, tmp_path: Path, photos: Path, canvas_crs: str) -> None:
    from pyproj import CRS, Transformer

    from cdikt_qgis.labelling import LabelPairsDialog, LabelStore
    from model_backend.labels import read_labels, ring_centre, ring_side_m

    canvas, layer = _canvas_on_raster(iface, canvas_crs)
    store = LabelStore(tmp_path / "labels.gpkg")
    dialog = LabelPairsDialog(store, canvas, 60.0, layer, iface.mainWindow())
    dialog.set_folder(str(photos))
    assert dialog.photo_list.count() == 3  # notes.txt is not listed
    dialog.photo_list.setCurrentRow(1)
    dialog.side_spin.setValue(250.0)
    dialog.heading_spin.setValue(0.0)
    dialog.place_button.setChecked(True)

    clicked = _click(canvas, dialog.tool, 400, 300)
    labels = read_labels(tmp_path / "labels.gpkg")  # saved at once, in the raster's CRS
    assert CRS.from_wkt(labels.crs_wkt) == CRS.from_epsg(26914)
    (label,) = labels.labels
    assert labels.photo_path(label) == (photos / "DJI_0001.JPG").absolute()
    to_raster = Transformer.from_crs(CRS.from_user_input(canvas_crs), CRS.from_epsg(26914), always_xy=True)
    want = to_raster.transform(clicked.x(), clicked.y())
    assert math.dist(ring_centre(label.ring), want) < 0.01
    assert ring_side_m(label.ring, labels.crs_wkt) == pytest.approx(250.0, rel=1e-3)
    assert "✓ labelled" in dialog.photo_list.item(1).text() and "not labelled" in dialog.photo_list.item(0).text()
    assert store.find_layer() is not None and store.find_layer().featureCount() == 1

    _click(canvas, dialog.tool, 500, 300, shift=True)  # aim: the click is due east of the label
    assert read_labels(tmp_path / "labels.gpkg").labels[0].heading == pytest.approx(90.0, abs=0.5)
    moved = _click(canvas, dialog.tool, 300, 200)  # a second click moves the same photo's label
    labels = read_labels(tmp_path / "labels.gpkg")
    assert len(labels.labels) == 1
    assert math.dist(ring_centre(labels.labels[0].ring), to_raster.transform(moved.x(), moved.y())) < 0.01
    dialog.side_spin.setValue(400.0)  # resize the selected label
    assert ring_side_m(read_labels(tmp_path / "labels.gpkg").labels[0].ring, labels.crs_wkt) == \
        pytest.approx(400.0, rel=1e-3)
    dialog.delete_selected()
    assert read_labels(tmp_path / "labels.gpkg").labels == []
    dialog.undo()
    restored = read_labels(tmp_path / "labels.gpkg").labels
    assert len(restored) == 1 and ring_side_m(restored[0].ring, labels.crs_wkt) == pytest.approx(400.0, rel=1e-3)
    dialog.done(0)
    assert canvas.mapTool() is not dialog.tool


def test_labels_persist_across_plugin_unload_and_reload(iface, data_dir: Path, photos: Path, tmp_path: Path) -> None:
    from qgis.core import QgsPointXY, QgsProject

    import cdikt_qgis
    from cdikt_qgis.labelling import LABELS_PROPERTY

    canvas, layer = _canvas_on_raster(iface, "EPSG:26914")
    QgsProject.instance().setFileName(str(tmp_path / "survey.qgz"))
    plugin = cdikt_qgis.classFactory(iface)
    plugin.initGui()
    plugin.show_dock()
    assert plugin.labelling.labels_path() == tmp_path / "survey_cdikt_labels.gpkg"  # beside the project
    dialog = plugin.labelling.open_dialog()
    dialog.set_folder(str(photos))
    dialog.select_photo(photos / "DJI_0002.JPG")
    centre = layer.extent().center()
    assert dialog.place_at(QgsPointXY(centre), layer.crs()) == 0
    plugin.unload()
    process_events()

    again = cdikt_qgis.classFactory(iface)
    again.initGui()
    again.show_dock()
    store = again.labelling.store()
    assert len(store) == 1 and store.index_of(photos / "DJI_0002.JPG") == 0
    shown = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.customProperty(LABELS_PROPERTY)]
    assert len(shown) == 1 and shown[0].featureCount() == 1  # the same layer, not a second copy
    again.unload()

    QgsProject.instance().setFileName("")  # an unsaved project keeps its labels in the user data folder
    from cdikt_qgis.plugin import CdiktPlugin

    assert isinstance(cdikt_qgis.classFactory(iface), CdiktPlugin)
    from cdikt_qgis.labelling import default_labels_path

    assert default_labels_path(QgsProject.instance(), str(data_dir)).parent == data_dir / "labels"


def test_accept_a_locate_candidate_and_a_failed_save_loses_nothing(iface, tmp_path: Path, photos: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from cdikt_qgis.labelling import LabellingController, LabelStore, accept_candidate
    from model_backend.candidates import Candidate
    from model_backend.labels import read_labels, ring_centre, ring_side_m
    from model_backend.raster import open_raster

    info = open_raster(RASTER)
    x0, y0 = 488000.0, 5207000.0
    ring = [(x0, y0), (x0 + 300, y0), (x0 + 300, y0 + 300), (x0, y0 + 300), (x0, y0)]
    cand = Candidate(rank=1, score=0.8, x=x0 + 150, y=y0 + 150, lon=0.0, lat=0.0, polygon=ring)
    result = SimpleNamespace(photo=str(photos / "DJI_0000.JPG"), candidates=[cand], crs_wkt=info.crs_wkt)
    controller = LabellingController(iface, last_result=lambda: result)
    monkeypatch.setattr(controller, "labels_path", lambda: tmp_path / "accepted.gpkg")
    assert controller.accept() == 0
    labels = read_labels(tmp_path / "accepted.gpkg")
    assert ring_centre(labels.labels[0].ring) == pytest.approx((x0 + 150, y0 + 150))
    assert ring_side_m(labels.labels[0].ring, labels.crs_wkt) == pytest.approx(300.0, rel=2e-3)

    store = LabelStore(tmp_path / "accepted.gpkg")
    before = (tmp_path / "accepted.gpkg").read_bytes()

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("model_backend.labels.write_labels", disk_full)
    with pytest.raises(OSError):
        accept_candidate(store, str(photos / "DJI_0001.JPG"), cand, info.crs_wkt)
    assert len(store) == 1 and (tmp_path / "accepted.gpkg").read_bytes() == before
    with pytest.raises(OSError):
        store.delete(0)
    assert len(store) == 1 and (tmp_path / "accepted.gpkg").read_bytes() == before
    controller.shutdown()

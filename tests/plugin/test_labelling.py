"""Labelling on a real canvas: map-tool clicks make labels in the raster's CRS, every edit is saved,
labels survive a plugin reload, a Locate candidate can be accepted, a failed save loses nothing,
a moved photo folder keeps its labels, and each message reaches the log once."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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
    from model_backend.learn.labels import read_labels, ring_centre, ring_side_m

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
    from model_backend.geo.raster import open_raster
    from model_backend.learn.labels import read_labels, ring_centre, ring_side_m
    from model_backend.locate.candidates import Candidate

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

    monkeypatch.setattr("model_backend.learn.labels.write_labels", disk_full)
    with pytest.raises(OSError):
        accept_candidate(store, str(photos / "DJI_0001.JPG"), cand, info.crs_wkt)
    assert len(store) == 1 and (tmp_path / "accepted.gpkg").read_bytes() == before
    with pytest.raises(OSError):
        store.delete(0)
    assert len(store) == 1 and (tmp_path / "accepted.gpkg").read_bytes() == before
    controller.shutdown()


@contextmanager
def _message_log() -> Iterator[list[tuple[str, str, int]]]:
    """Every (text, tab, level) QGIS's message log receives meanwhile; with the plugin's logging handler on,
    so a message also sent through Python logging shows up as the duplicate it would be inside QGIS."""
    from qgis.core import QgsApplication

    from cdikt_qgis import log as cdikt_log

    had_handler = cdikt_log._handler is not None
    cdikt_log.install()
    got: list[tuple[str, str, int]] = []

    def record(text: str, tag: str, level) -> None:
        got.append((text, tag, int(level)))

    QgsApplication.messageLog().messageReceived.connect(record)
    try:
        yield got
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(record)
        if not had_handler:
            cdikt_log.uninstall()


def _status_text(dialog, row: int) -> str:
    return dialog.photo_list.item(row).text().split("\n")[1]


def test_a_moved_or_copied_photo_keeps_its_label(iface, tmp_path: Path, photos: Path) -> None:
    from pyproj import CRS
    from qgis.core import QgsPointXY, QgsProject, QgsRasterLayer

    from cdikt_qgis.labelling import LabelPairsDialog, LabelStore
    from model_backend.core.checksums import sha256_file as file_sha256
    from model_backend.learn.labels import read_labels, ring_side_m

    layer = QgsRasterLayer(str(RASTER), "naip 2015")
    QgsProject.instance().addMapLayer(layer)  # the dialog's raster box lists project layers
    store = LabelStore(tmp_path / "labels.gpkg")
    dialog = LabelPairsDialog(store, None, 60.0, layer, iface.mainWindow())
    dialog.set_folder(str(photos))
    dialog.select_photo(photos / "DJI_0001.JPG")
    dialog.side_spin.setValue(250.0)
    assert dialog.place_at(QgsPointXY(layer.extent().center()), layer.crs()) == 0
    first = read_labels(tmp_path / "labels.gpkg")
    assert CRS.from_wkt(first.crs_wkt) == CRS.from_epsg(26914)  # the raster's
    (saved,) = first.labels
    assert saved.photo == "flight/DJI_0001.JPG"  # relative to the labels file: a rename breaks the path
    assert saved.photo_sha256 == file_sha256(photos / "DJI_0001.JPG")
    dialog.done(0)

    moved = photos.rename(tmp_path / "flight 2015-06 (archived)")  # the analyst renames the folder
    reopened = LabelStore(tmp_path / "labels.gpkg")  # as after a QGIS restart: nothing cached
    assert reopened.index_of(moved / "DJI_0001.JPG") == 0
    assert reopened.index_of(moved / "DJI_0000.JPG") is None  # another photo of the same size is not it
    dialog = LabelPairsDialog(reopened, None, 60.0, layer, iface.mainWindow())
    dialog.set_folder(str(moved))
    assert [_status_text(dialog, r) for r in range(3)] == ["not labelled", "✓ labelled", "not labelled"]
    dialog.select_photo(moved / "DJI_0001.JPG")  # the controls show the found label, not EXIF defaults
    assert dialog.side_spin.value() == pytest.approx(250.0, rel=1e-3)

    elsewhere = tmp_path / "usb stick"
    elsewhere.mkdir()
    copy = Path(shutil.copy2(moved / "DJI_0001.JPG", elsewhere / "renamed.jpg"))
    assert reopened.index_of(copy) == 0 and reopened.is_labelled(copy)

    dialog.side_spin.setValue(300.0)  # editing the found label relinks it to where the photo is now
    labels = read_labels(tmp_path / "labels.gpkg")
    assert len(labels.labels) == 1
    assert labels.photo_path(labels.labels[0]) == (moved / "DJI_0001.JPG").absolute()
    assert ring_side_m(labels.labels[0].ring, labels.crs_wkt) == pytest.approx(300.0, rel=1e-3)
    dialog.done(0)


def _write_old_labels(path: Path, photos: list[Path]) -> None:
    """A labels GeoPackage as written before `photo_sha256` existed (fields: photo, heading, created, edited)."""
    from osgeo import ogr, osr

    from model_backend.learn.labels import square_footprint

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(26914)
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    lyr = ds.CreateLayer("labels", srs, ogr.wkbPolygon, options=["GEOMETRY_NAME=geom", "FID=fid"])
    for name in ("photo", "heading", "created", "edited"):
        lyr.CreateField(ogr.FieldDefn(name, ogr.OFTReal if name == "heading" else ogr.OFTString))
    for i, photo in enumerate(photos):
        feat = ogr.Feature(lyr.GetLayerDefn())
        feat.SetField("photo", str(photo))
        feat.SetField("heading", 10.0 * i)
        feat.SetField("created", "2024-05-01T10:00:00Z")
        feat.SetField("edited", "2024-05-01T10:00:00Z")
        ring = square_footprint(488000.0 + 500 * i, 5207000.0, 200.0, 10.0 * i, srs.ExportToWkt())
        feat.SetGeometry(ogr.CreateGeometryFromWkt("POLYGON ((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"))
        lyr.CreateFeature(feat)
    feat = lyr = ds = None


def test_an_old_labels_file_without_hashes_stays_readable_and_gains_them(tmp_path: Path, photos: Path) -> None:
    from osgeo import ogr

    from cdikt_qgis.labelling import LabelStore
    from model_backend.core.checksums import sha256_file as file_sha256
    from model_backend.learn.labels import read_labels

    old = tmp_path / "old_labels.gpkg"
    lost = photos / "DJI_0007.JPG"  # deleted long ago: it keeps its label, and no hash can be made for it
    _write_old_labels(old, [lost, photos / "DJI_0000.JPG", photos / "DJI_0002.JPG"])
    store = LabelStore(old)
    assert len(store) == 3 and [lb.photo_sha256 for lb in store.labels.labels] == ["", "", ""]
    assert store.index_of(photos / "DJI_0002.JPG") == 2  # by path, as before
    store.reshape(1, side_m=150.0)  # the first edit rewrites the file: with the field, hashes filled in

    ds = ogr.Open(str(old))
    defn = ds.GetLayerByName("labels").GetLayerDefn()
    assert "photo_sha256" in [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    ds = None
    labels = read_labels(old)
    assert [lb.photo for lb in labels.labels] == [str(lost), str(photos / "DJI_0000.JPG"),
                                                  str(photos / "DJI_0002.JPG")]
    assert [lb.photo_sha256 for lb in labels.labels] == ["", file_sha256(photos / "DJI_0000.JPG"),
                                                         file_sha256(photos / "DJI_0002.JPG")]
    assert [lb.heading for lb in labels.labels] == [0.0, 10.0, 20.0]
    assert labels.labels[2].created == "2024-05-01T10:00:00Z"

    moved = photos.rename(tmp_path / "moved")
    again = LabelStore(old)
    assert again.index_of(moved / "DJI_0002.JPG") == 2 and again.index_of(moved / "DJI_0000.JPG") == 1
    assert again.index_of(moved / "DJI_0001.JPG") is None
    listed = [moved / f"DJI_{i:04d}.JPG" for i in range(3)]
    assert again.labelled_among(listed) == {listed[0], listed[2]}


def test_the_close_button_closes_the_dialog_and_frees_the_map(iface, tmp_path: Path, photos: Path) -> None:
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest
    from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox

    from cdikt_qgis.labelling import LabelPairsDialog, LabelStore

    canvas, layer = _canvas_on_raster(iface, "EPSG:26914")
    dialog = LabelPairsDialog(LabelStore(tmp_path / "labels.gpkg"), canvas, 60.0, layer, iface.mainWindow())
    dialog.show()
    dialog.place_button.setChecked(True)
    assert dialog.isVisible() and canvas.mapTool() is dialog.tool
    close = dialog.buttons.button(QDialogButtonBox.Close)
    assert close is not None and close.isVisible()
    QTest.mouseClick(close, Qt.LeftButton)
    process_events()
    assert not dialog.isVisible() and dialog.result() == QDialog.Rejected
    assert canvas.mapTool() is not dialog.tool and not dialog.place_button.isChecked()


def test_bad_input_is_one_line_a_bug_also_logs_its_traceback_and_saved_labels_stay(
        iface, data_dir: Path, photos: Path) -> None:
    from qgis.core import Qgis, QgsPointXY, QgsProject, QgsRasterLayer

    from cdikt_qgis.labelling import LabellingController

    layer = QgsRasterLayer(str(RASTER), "naip 2015")
    QgsProject.instance().addMapLayer(layer)
    controller = LabellingController(iface, raster=lambda: layer)
    dialog = controller.open_dialog()
    dialog.set_folder(str(photos))
    dialog.select_photo(photos / "DJI_0000.JPG")
    centre = QgsPointXY(layer.extent().center())
    assert dialog.place_at(centre, layer.crs()) == 0
    labels_file = controller.labels_path()
    saved = labels_file.read_bytes()

    dialog.select_photo(photos / "DJI_0001.JPG")
    (photos / "DJI_0001.JPG").unlink()  # gone (a network drive dropped) after it was selected
    with _message_log() as logged:
        assert dialog.place_at(centre, layer.crs()) is None
    assert dialog.status.text() == f"Labels not saved: Photo DJI_0001.JPG cannot be read at " \
                                   f"{(photos / 'DJI_0001.JPG').absolute()}; check the file."
    assert iface.messages()[-1] == ("CDIKT", dialog.status.text(), int(Qgis.Warning))
    assert not [m for m in logged if m[1] == "CDIKT"]  # an expected error: no traceback
    assert len(controller.store()) == 1 and labels_file.read_bytes() == saved

    dialog.select_photo(photos / "DJI_0000.JPG")
    with _message_log() as logged:  # a caller's bug: no CRS object where one is required
        assert dialog.place_at(centre, None) is None
    assert dialog.status.text() == "Labels not saved: unexpected AttributeError (full traceback in the CDIKT log)."
    assert iface.messages()[-1] == ("CDIKT", dialog.status.text(), int(Qgis.Critical))
    tracebacks = [m for m in logged if m[1] == "CDIKT"]
    assert len(tracebacks) == 1 and tracebacks[0][2] == int(Qgis.Critical)
    assert tracebacks[0][0].startswith("Traceback (most recent call last)") and "AttributeError" in tracebacks[0][0]
    assert "to_labels_crs" in tracebacks[0][0]  # the frame that failed, for whoever fixes it
    assert len(controller.store()) == 1 and labels_file.read_bytes() == saved
    controller.shutdown()


@pytest.mark.parametrize("with_bar", [True, False])
def test_each_message_is_logged_once(iface, with_bar: bool) -> None:
    from qgis.core import Qgis

    from cdikt_qgis.labelling import LabellingController

    controller = LabellingController(iface if with_bar else None, last_result=lambda: None)
    with _message_log() as logged:
        assert controller.accept() is None  # nothing located yet: the controller says so
    said = [m for m in logged if "Locate a photo first" in m[0]]
    if with_bar:  # the bar copies what it shows into the "Messages" tab; nothing else logs it
        assert said == [("CDIKT : Locate a photo first; then accept the candidate that is right.", "Messages",
                         int(Qgis.Info))]
        assert iface.messages()[-1][1] == "Locate a photo first; then accept the candidate that is right."
    else:  # no bar (a script, qgis_process): logged once under CDIKT
        assert said == [("Locate a photo first; then accept the candidate that is right.", "CDIKT", int(Qgis.Info))]
        assert iface.messages() == []
    controller.shutdown()

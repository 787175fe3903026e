"""Styling, grouping, zoom, export and headless rendering on real files written by the engine."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio


@dataclass
class ResultData:
    """The LocateResult fields the plugin reads (a plain record: these tests need no model)."""

    photo: str
    heatmap_path: str
    geojson_path: str
    gpkg_path: str
    crs_wkt: str
    candidates: list = field(default_factory=list)


def _result(case: dict, photo: str = "/photos/DJI_0042.JPG") -> ResultData:
    return ResultData(photo, case["heatmap"], case["geojson"], case["gpkg"], case["crs_wkt"], case["candidates"])


def _label_rules(layer) -> dict:
    """Description -> rule of a candidates layer's rule-based labelling."""
    from qgis.core import QgsRuleBasedLabeling

    labeling = layer.labeling()
    assert isinstance(labeling, QgsRuleBasedLabeling)
    return {rule.description(): rule for rule in labeling.rootRule().children()}


def _decimals(label: str) -> int:
    """Most digits after a decimal point in any number of ``label``."""
    return max((len(m) for m in re.findall(r"\d\.(\d+)", label)), default=0)


def test_heatmap_is_pseudocolour_in_the_raster_crs_with_transparent_nodata(heatmap_case: dict) -> None:
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsSingleBandPseudoColorRenderer

    from cdikt_qgis.layers import HEATMAP_OPACITY, heatmap_layer

    layer = heatmap_layer(heatmap_case["heatmap"])
    renderer = layer.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    raster = QgsRasterLayer(heatmap_case["raster"], "raster")
    assert layer.crs() == raster.crs() == QgsCoordinateReferenceSystem("EPSG:28992")
    with rasterio.open(heatmap_case["heatmap"]) as ds:
        data = ds.read(1, masked=True)
    assert renderer.classificationMin() == pytest.approx(float(data.min()), abs=1e-5)
    assert renderer.classificationMax() == pytest.approx(float(data.max()), abs=1e-5)
    assert renderer.opacity() == pytest.approx(HEATMAP_OPACITY)
    items = renderer.shader().rasterShaderFunction().colorRampItemList()
    assert len(items) >= 5 and items[0].color != items[-1].color

    # render the layer's own grid: nodata cells (the southern strip) must come out fully transparent
    provider = layer.dataProvider()
    w, h = provider.xSize(), provider.ySize()
    image = renderer.block(1, layer.extent(), w, h).image()
    assert image.pixelColor(w // 2, h - 1).alpha() == 0
    assert image.pixelColor(w // 2, h // 4).alpha() > 0


def test_candidates_are_outlines_labelled_by_rank_with_rank_one_stronger(heatmap_case: dict) -> None:
    from qgis.core import QgsRuleBasedRenderer

    from cdikt_qgis.layers import GEOJSON_PROPERTY, candidates_layer

    layer = candidates_layer(heatmap_case["gpkg"], geojson_path=heatmap_case["geojson"])
    assert layer.featureCount() == 5
    assert layer.crs().authid() == "EPSG:28992"
    renderer = layer.renderer()
    assert isinstance(renderer, QgsRuleBasedRenderer)
    rules = {r.label(): r for r in renderer.rootRule().children()}
    # not verified (the case has no verification): the tiles are dashed, #1 still the strongest
    best, others = rules["Best match (tile, not verified)"], rules["Other candidate tiles"]
    assert best.filterExpression() == '"rank" = 1 AND NOT coalesce("verified", false)' and others.isElse()
    for rule in (best, others):
        assert rule.symbol().symbolLayer(0).brushStyle() == 0  # Qt.NoBrush: outline only
    assert best.symbol().symbolLayer(0).strokeWidth() > others.symbol().symbolLayer(0).strokeWidth()
    assert layer.labelsEnabled()
    assert all('"rank"' in rule.settings().fieldName for rule in _label_rules(layer).values())
    assert layer.customProperty(GEOJSON_PROPERTY) == heatmap_case["geojson"]


def test_result_layers_are_grouped_under_the_photo_and_canvas_zooms_to_rank_one(iface, heatmap_case) -> None:
    from qgis.core import (
        QgsCoordinateReferenceSystem,
        QgsCoordinateTransform,
        QgsPointXY,
        QgsProject,
        QgsRasterLayer,
        QgsVectorLayer,
    )

    from cdikt_qgis.layers import add_result_layers

    project = QgsProject.instance()
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))  # not the raster's CRS
    result = _result(heatmap_case)
    group = add_result_layers(result, project, canvas)
    assert group.name() == "DJI_0042.JPG"
    assert project.layerTreeRoot().children()[0] is group
    layers = [node.layer() for node in group.findLayers()]
    assert isinstance(layers[0], QgsVectorLayer) and isinstance(layers[1], QgsRasterLayer)
    best = result.candidates[0]
    xform = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:28992"),
                                   QgsCoordinateReferenceSystem("EPSG:3857"), project)
    centre = xform.transform(QgsPointXY(best.x, best.y))
    extent = canvas.extent()
    assert extent.contains(centre)
    assert min(extent.width(), extent.height()) < 500  # the footprint with context, not the raster


def test_export_copies_the_engines_rfc7946_geojson(iface, heatmap_case, tmp_path: Path) -> None:
    from qgis.core import QgsVectorLayer

    from cdikt_qgis.layers import candidates_layer, export_candidates
    from model_backend.locate.export import geojson_problems

    out = export_candidates(_result(heatmap_case), tmp_path / "sub" / "matches")
    assert out.endswith("matches.geojson")
    doc = json.loads(Path(out).read_text())
    assert geojson_problems(doc) == [] and len(doc["features"]) == 5
    assert Path(out).read_bytes() == Path(heatmap_case["geojson"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["matches.geojson"]  # no temp left

    layer = candidates_layer(heatmap_case["gpkg"], geojson_path=heatmap_case["geojson"])
    assert Path(export_candidates(layer, tmp_path / "b.geojson")).is_file()
    stranger = QgsVectorLayer(heatmap_case["gpkg"], "someone else's", "ogr")
    with pytest.raises(ValueError, match="not a CDIKT candidates layer"):
        export_candidates(stranger, tmp_path / "c.geojson")


def test_render_png_draws_raster_heatmap_candidates_and_truth(qgis_app, heatmap_case, tmp_path: Path) -> None:
    from qgis.PyQt.QtGui import QImage

    from cdikt_qgis.layers import BEST_COLOUR, TRUTH_COLOUR
    from cdikt_qgis.render import render_png

    best = heatmap_case["candidates"][0]
    with rasterio.open(heatmap_case["raster"]) as ds:
        from pyproj import Transformer

        to_ll = Transformer.from_crs(ds.crs.to_wkt(), "EPSG:4326", always_xy=True)
        aspect = ds.height / ds.width
    ring = [list(to_ll.transform(x + 5, y - 5)) for x, y in best.polygon]  # truth near the best match
    truth = json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]})

    out = render_png(heatmap_case["raster"], heatmap_case["heatmap"], heatmap_case["geojson"],
                     str(tmp_path / "map.png"), width=600, truth_geojson=truth)
    assert out == str(tmp_path / "map.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
    image = QImage(out)
    assert image.width() == 600 and image.height() == round(600 * aspect)

    rgb32 = image.convertToFormat(QImage.Format_RGB32)  # keep it alive while its bits are read
    ptr = rgb32.constBits()
    ptr.setsize(rgb32.bytesPerLine() * rgb32.height())
    rows = np.frombuffer(ptr, dtype=np.uint8).reshape(rgb32.height(), rgb32.bytesPerLine() // 4, 4)
    px = rows[:, : rgb32.width(), 2::-1].copy()  # BGRA -> RGB
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1000  # a real picture, not a flat fill

    def share(hex_colour: str) -> float:
        target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return float((np.abs(px.astype(int) - target).sum(axis=2) < 40).mean())

    assert share(BEST_COLOUR) > 1e-4  # the rank-1 outline is drawn
    assert share(TRUTH_COLOUR) > 1e-4  # and so is the truth polygon

    plain = render_png(heatmap_case["raster"], None, None, str(tmp_path / "plain.png"), width=300)
    assert QImage(plain).width() == 300


def test_verified_footprints_are_solid_and_unverified_tiles_dashed(qgis_app, tmp_path: Path) -> None:
    """After verification the layer mixes real footprints and plain tiles; the style must tell them apart."""
    import pyproj
    from qgis.core import QgsRuleBasedRenderer

    from cdikt_qgis.layers import candidates_layer
    from model_backend.locate.candidates import Candidate
    from model_backend.locate.export import write_gpkg

    ring = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0), (0.0, 0.0)]
    cands = [Candidate(1, 0.9, 5, 5, 0.0, 0.0, ring, verified=True, confidence=0.98, inliers=120,
                       heading_deg=30.0, gsd_m=0.1),
             Candidate(2, 0.8, 25, 5, 0.0, 0.0, [(x + 20, y) for x, y in ring], verified=False, confidence=0.0,
                       inliers=3)]
    wkt = pyproj.CRS.from_epsg(32633).to_wkt()
    path = write_gpkg(str(tmp_path / "m.gpkg"), cands, wkt, {"photo": "p.jpg"})
    layer = candidates_layer(path)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsRuleBasedRenderer)
    rules = renderer.rootRule().children()
    assert len(rules) == 4
    styles = {r.label(): r.symbol().symbolLayer(0).strokeStyle() for r in rules}
    assert styles["Best match (verified footprint)"] != styles["Best match (tile, not verified)"]
    for rule in _label_rules(layer).values():
        label_expr = rule.settings().fieldName
        assert "verified" in label_expr and "confidence" in label_expr


def test_a_new_result_hides_and_collapses_earlier_results_only(qgis_app, heatmap_case) -> None:
    """Two photos' candidates drawn at once read as one set; the analyst's own groups stay as they are."""
    from qgis.core import QgsProject

    from cdikt_qgis.layers import RESULT_GROUP_PROPERTY, add_result_layers

    project = QgsProject.instance()
    root = project.layerTreeRoot()
    mine = root.addGroup("my basemaps")
    mine.setExpanded(True)
    first = add_result_layers(_result(heatmap_case, "/photos/DJI_0001.JPG"), project)
    assert first.isVisible() and first.isExpanded()
    moved = first.clone()  # the analyst drags the first result into a folder of theirs (a drag clones)
    mine.insertChildNode(0, moved)
    root.removeChildNode(first)
    first = moved
    second = add_result_layers(_result(heatmap_case, "/photos/DJI_0002.JPG"), project)

    assert first.customProperty(RESULT_GROUP_PROPERTY) == "/photos/DJI_0001.JPG"
    assert not first.itemVisibilityChecked() and not first.isExpanded()
    assert not any(node.isVisible() for node in first.findLayers())  # nothing of photo 1 is drawn
    assert second.itemVisibilityChecked() and second.isExpanded() and second.isVisible()
    assert all(node.isVisible() for node in second.findLayers())
    assert root.children()[0] is second
    assert mine.itemVisibilityChecked() and mine.isExpanded()  # not ours: untouched
    assert not mine.customProperty(RESULT_GROUP_PROPERTY)

    third = add_result_layers(_result(heatmap_case, "/photos/DJI_0003.JPG"), project)
    assert not second.itemVisibilityChecked() and not second.isExpanded()
    assert third.itemVisibilityChecked() and third.isExpanded()


def test_rank_one_label_always_shows_and_the_others_give_way(qgis_app, tmp_path: Path) -> None:
    """Five footprints on one spot under another layer's top-priority labels: #1 must still be drawn."""
    import pyproj
    from qgis.core import (
        QgsMapRendererCustomPainterJob,
        QgsMapSettings,
        QgsPalLayerSettings,
        QgsRectangle,
        QgsVectorLayer,
        QgsVectorLayerSimpleLabeling,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    from cdikt_qgis.layers import BEST_LABEL_PRIORITY, candidates_layer
    from model_backend.locate.candidates import Candidate
    from model_backend.locate.export import write_gpkg

    ring = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0), (0.0, 0.0)]
    cands = [Candidate(r, 1.0 - r / 10, 5.0 + r / 10, 5.0, 0.0, 0.0, [(x + r / 10, y) for x, y in ring])
             for r in range(1, 6)]
    path = write_gpkg(str(tmp_path / "m.gpkg"), cands, pyproj.CRS.from_epsg(32633).to_wkt(), {"photo": "p.jpg"})
    layer = candidates_layer(path)

    rules = _label_rules(layer)
    best, others = rules["Best match"], rules["Other candidates"]
    assert best.filterExpression() == '"rank" = 1' and others.isElse()
    assert best.settings().displayAll and best.settings().priority == BEST_LABEL_PRIORITY == 10
    assert not others.settings().displayAll and others.settings().priority < BEST_LABEL_PRIORITY

    # Another layer (an older result, a basemap's names) labels the same spot at the highest priority.
    blocker = QgsVectorLayer(path, "blocker", "ogr")
    pal = QgsPalLayerSettings()
    pal.fieldName, pal.isExpression, pal.priority = "'XXXXXXXX'", True, 10
    pal.placement = QgsPalLayerSettings.OverPoint
    blocker.setLabeling(QgsVectorLayerSimpleLabeling(pal))
    blocker.setLabelsEnabled(True)
    settings = QgsMapSettings()
    settings.setLayers([blocker, layer])
    settings.setDestinationCrs(layer.crs())
    settings.setOutputSize(QSize(200, 200))
    settings.setExtent(QgsRectangle(-50, -50, 60, 60))  # all five labels fall on the same few pixels
    settings.setFlag(QgsMapSettings.DrawLabeling, True)
    image = QImage(QSize(200, 200), QImage.Format_ARGB32_Premultiplied)
    image.fill(QColor("white"))
    painter = QPainter(image)
    job = QgsMapRendererCustomPainterJob(settings, painter)
    job.renderSynchronously()
    painter.end()
    drawn = [p.labelText for p in job.takeLabelingResults().allLabels()
             if p.layerID == layer.id() and not p.isUnplaced]
    assert "#1" in drawn
    assert len(drawn) < 5  # the other ranks still give way where they collide


def test_heatmap_legend_is_short_and_rounded(qgis_app, heatmap_case, tmp_path: Path) -> None:
    """What the Layers panel shows: a short band name and scores to at most 3 decimals, even for a tight range."""
    from qgis.core import (
        QgsColorRampLegendNode,
        QgsLayerTreeModel,
        QgsNumericFormatContext,
        QgsProject,
        QgsSimpleLegendNode,
    )
    from qgis.PyQt.QtCore import Qt

    from cdikt_qgis.layers import heatmap_layer
    from model_backend.locate.heatmap import write_heatmap
    from model_backend.locate.scores import TileScores

    grid = heatmap_case["grid"]
    rows, cols = np.meshgrid(np.arange(grid.n_rows), np.arange(grid.n_cols), indexing="ij")
    rng = np.random.default_rng(0)
    cosines = 0.8123456 + 0.004 * rng.random(cols.size)  # differing in the 3rd decimal
    tight = write_heatmap(str(tmp_path / "tight.tif"), TileScores(grid, cols, rows, cosines))

    project = QgsProject.instance()
    model = QgsLayerTreeModel(project.layerTreeRoot())
    for path, decimals in ((heatmap_case["heatmap"], 2), (tight, 3)):
        layer = heatmap_layer(path)
        project.addMapLayer(layer)
        nodes = model.layerLegendNodes(project.layerTreeRoot().findLayer(layer.id()))
        titles = [n.data(Qt.DisplayRole) for n in nodes if isinstance(n, QgsSimpleLegendNode)]
        assert len(titles) == 1 and "match score" in titles[0] and len(titles[0]) <= 30, titles

        ramps = [n for n in nodes if isinstance(n, QgsColorRampLegendNode)]
        assert len(ramps) == 1  # QGIS 3.22 draws one continuous bar labelled min..max
        legend = ramps[0].settings()
        assert legend.minimumLabel() == legend.maximumLabel() == ""  # labels follow the number format
        renderer = layer.renderer()
        ends = [legend.prefix() + legend.numericFormat().formatDouble(v, QgsNumericFormatContext()) + legend.suffix()
                for v in (renderer.classificationMin(), renderer.classificationMax())]
        assert [_decimals(e) for e in ends] == [decimals, decimals], ends
        assert ends[0] != ends[1]

        items = [label for label, _ in renderer.legendSymbologyItems()]  # the discrete legend, if switched to
        assert len(items) >= 5 and max(_decimals(label) for label in items) == decimals, items

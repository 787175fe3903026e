"""Styling, grouping, zoom, export and headless rendering on real files written by the engine."""

from __future__ import annotations

import json
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


def _result(case: dict) -> ResultData:
    return ResultData("/photos/DJI_0042.JPG", case["heatmap"], case["geojson"], case["gpkg"], case["crs_wkt"],
                      case["candidates"])


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
    best, others = rules["Best match"], rules["Other candidates"]
    assert best.filterExpression() == '"rank" = 1' and others.isElse()
    for rule in (best, others):
        assert rule.symbol().symbolLayer(0).brushStyle() == 0  # Qt.NoBrush: outline only
    assert best.symbol().symbolLayer(0).strokeWidth() > others.symbol().symbolLayer(0).strokeWidth()
    assert layer.labelsEnabled() and '"rank"' in layer.labeling().settings().fieldName
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
    from model_backend.export import geojson_problems

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
    from model_backend.candidates import Candidate
    from model_backend.export import write_gpkg

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
    label_expr = layer.labeling().settings().fieldName
    assert "verified" in label_expr and "confidence" in label_expr

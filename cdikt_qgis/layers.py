"""Turn an engine result into styled QGIS layers (main thread only).

Styling is done in code rather than .qml files so the colour range follows each heatmap's own
score range (cosine similarities cluster tightly, so a fixed -1..1 ramp would look flat) and
so render.py can style layers identically without a project.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgis.core import (
    QgsBasicNumericFormat,
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGradientStop,
    QgsLayerTreeGroup,
    QgsPalLayerSettings,
    QgsProject,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRectangle,
    QgsRuleBasedLabeling,
    QgsRuleBasedRenderer,
    QgsSingleBandPseudoColorRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

if TYPE_CHECKING:
    from qgis.gui import QgsMapCanvas

GEOJSON_PROPERTY = "cdikt/geojson_path"
"""Custom layer property: the engine's RFC 7946 GeoJSON behind a candidates layer."""

RESULT_GROUP_PROPERTY = "cdikt/result_photo"
"""Custom group property: marks a layer-tree group as a CDIKT result (value: the photo's path),
so hiding earlier results never touches the analyst's own groups."""

BEST_LABEL_PRIORITY = 10
"""QGIS label priority runs 0 (lowest) to 10 (highest); rank 1 gets the top, the rest the default 5."""

HEATMAP_OPACITY = 0.6

# Viridis, sampled at 9 stops: perceptually uniform and readable by colour-blind users.
_VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")

BEST_COLOUR = "#ff2d20"
OTHER_COLOUR = "#ff9f1c"
TRUTH_COLOUR = "#ff00ff"


def _ramp() -> QgsGradientColorRamp:
    stops = [QgsGradientStop(i / (len(_VIRIDIS) - 1), QColor(c)) for i, c in enumerate(_VIRIDIS[1:-1], 1)]
    return QgsGradientColorRamp(QColor(_VIRIDIS[0]), QColor(_VIRIDIS[-1]), False, stops)


def score_range(layer: QgsRasterLayer) -> tuple[float, float]:
    """Min and max of band 1 over valid cells (nodata excluded by the provider)."""
    stats = layer.dataProvider().bandStatistics(1, QgsRasterBandStats.Min | QgsRasterBandStats.Max,
                                               layer.extent(), 0)
    lo, hi = float(stats.minimumValue), float(stats.maximumValue)
    if not (lo == lo and hi == hi) or lo > hi:  # NaN or no valid cell at all
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-9:  # a constant heatmap still needs a non-empty ramp
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    return lo, hi


def legend_decimals(lo: float, hi: float, steps: int = len(_VIRIDIS) - 1) -> int:
    """2 decimals, or 3 when the legend's ``steps`` classes of a tight range would repeat 2-decimal labels.

    Cosine similarities of one search often differ only in the third decimal; more than 3 is
    noise to an analyst (QGIS's default legend format prints 6).
    """
    return 2 if (hi - lo) / max(steps, 1) >= 0.01 - 1e-12 else 3


def style_heatmap(layer: QgsRasterLayer,
                  opacity: float = HEATMAP_OPACITY) -> QgsSingleBandPseudoColorRenderer:
    """Pseudocolour the similarity band from its own min..max; nodata stays transparent."""
    provider = layer.dataProvider()
    provider.setUseSourceNoDataValue(1, True)
    lo, hi = score_range(layer)
    decimals = legend_decimals(lo, hi)
    ramp = _ramp()
    shader_fn = QgsColorRampShader(lo, hi)
    shader_fn.setColorRampType(QgsColorRampShader.Interpolated)
    shader_fn.setSourceColorRamp(ramp.clone())
    n = len(_VIRIDIS)
    items = []
    for i in range(n):
        value = lo + (hi - lo) * i / (n - 1)
        items.append(QgsColorRampShader.ColorRampItem(value, ramp.color(i / (n - 1)), f"{value:.{decimals}f}"))
    shader_fn.setColorRampItemList(items)
    # QGIS 3.22 draws an interpolated ramp as one continuous legend bar labelled min..max through
    # this number format, not through the item labels above (those serve the discrete legend).
    number_format = QgsBasicNumericFormat()
    number_format.setNumberDecimalPlaces(decimals)
    number_format.setShowTrailingZeros(True)
    legend = QgsColorRampLegendNodeSettings()
    legend.setUseContinuousLegend(True)
    legend.setNumericFormat(number_format)
    shader_fn.setLegendSettings(legend)
    shader = QgsRasterShader(lo, hi)
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(provider, 1, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    renderer.setOpacity(opacity)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return renderer


def _outline(colour: str, width_mm: float, dashed: bool = False) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple({
        "style": "no", "outline_color": colour, "outline_width": f"{width_mm}",
        "outline_width_unit": "MM", "outline_style": "dash" if dashed else "solid", "joinstyle": "miter",
    })


def style_candidates(layer: QgsVectorLayer) -> None:
    """Outline-only footprints labelled by rank; rank 1 thicker and red so it reads first."""
    fields = layer.fields().names()
    has_rank = "rank" in fields
    has_verified = "verified" in fields
    root = QgsRuleBasedRenderer.Rule(None)
    if has_rank and has_verified:
        # Verified candidates are the photo's real footprint (a quadrilateral): solid; unverified
        # ones are still retrieval tiles: dashed, so nobody mistakes a tile for a footprint.
        for expr, colour, width, dashed, label in (
                ('"rank" = 1 AND coalesce("verified", false)', BEST_COLOUR, 1.0, False,
                 "Best match (verified footprint)"),
                ('"rank" = 1 AND NOT coalesce("verified", false)', BEST_COLOUR, 0.8, True,
                 "Best match (tile, not verified)"),
                ('"rank" <> 1 AND coalesce("verified", false)', OTHER_COLOUR, 0.6, False, "Verified footprints"),
                ("ELSE", OTHER_COLOUR, 0.4, True, "Other candidate tiles")):
            root.appendChild(QgsRuleBasedRenderer.Rule(_outline(colour, width, dashed), 0, 0, expr, label))
    elif has_rank:
        others = QgsRuleBasedRenderer.Rule(_outline(OTHER_COLOUR, 0.5), 0, 0, "ELSE", "Other candidates")
        best = QgsRuleBasedRenderer.Rule(_outline(BEST_COLOUR, 1.0), 0, 0, '"rank" = 1', "Best match")
        root.appendChild(best)
        root.appendChild(others)
    else:
        root.appendChild(QgsRuleBasedRenderer.Rule(_outline(BEST_COLOUR, 0.7), 0, 0, "", "Candidates"))
    renderer = QgsRuleBasedRenderer(root)
    if has_rank:  # worst first, so the best match's outline lies on top where footprints touch
        renderer.setOrderBy(QgsFeatureRequest.OrderBy([QgsFeatureRequest.OrderByClause('"rank"', False)]))
        renderer.setOrderByEnabled(True)
    layer.setRenderer(renderer)

    text = QgsTextFormat()
    text.setSize(10)
    text.setColor(QColor("white"))
    font = text.font()
    font.setBold(True)
    text.setFont(font)
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor("black"))
    text.setBuffer(buffer)
    pal = QgsPalLayerSettings()
    if has_rank and has_verified:
        pal.fieldName = ("'#' || \"rank\" || if(\"verified\", ' ✓ ' || format_number(\"confidence\", 2), '')")
    else:
        pal.fieldName = "'#' || \"rank\"" if has_rank else "'#' || ($id)"
    pal.isExpression = True
    pal.setFormat(text)
    pal.placement = QgsPalLayerSettings.OverPoint
    root_rule = QgsRuleBasedLabeling.Rule(None)
    if has_rank:
        # The best match's label must never lose a collision (against the other candidates or any
        # other layer's labels): it is the answer. The others keep normal collision handling.
        best = QgsPalLayerSettings(pal)
        best.displayAll = True
        best.priority = BEST_LABEL_PRIORITY
        best.zIndex = 1.0  # drawn above overlapping labels
        root_rule.appendChild(QgsRuleBasedLabeling.Rule(best, 0, 0, '"rank" = 1', "Best match"))
        root_rule.appendChild(QgsRuleBasedLabeling.Rule(pal, 0, 0, "ELSE", "Other candidates", True))
    else:
        root_rule.appendChild(QgsRuleBasedLabeling.Rule(pal, 0, 0, "", "Candidates"))
    layer.setLabeling(QgsRuleBasedLabeling(root_rule))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def style_truth(layer: QgsVectorLayer) -> None:
    """The known true footprint (demo/evaluation only), dashed magenta to stand apart."""
    root = QgsRuleBasedRenderer.Rule(None)
    root.appendChild(QgsRuleBasedRenderer.Rule(_outline(TRUTH_COLOUR, 0.8, dashed=True), 0, 0, "", "Truth"))
    layer.setRenderer(QgsRuleBasedRenderer(root))


def heatmap_layer(path: str, name: str = "Similarity") -> QgsRasterLayer:
    layer = QgsRasterLayer(path, name, "gdal")
    if not layer.isValid():
        raise ValueError(f"QGIS cannot open the heatmap {path}")
    style_heatmap(layer)
    return layer


def candidates_layer(path: str, name: str = "Candidates", geojson_path: str | None = None) -> QgsVectorLayer:
    layer = QgsVectorLayer(path, name, "ogr")
    if not layer.isValid():
        raise ValueError(f"QGIS cannot open the candidates {path}")
    style_candidates(layer)
    if geojson_path:
        layer.setCustomProperty(GEOJSON_PROPERTY, geojson_path)
    return layer


def result_groups(node: QgsLayerTreeGroup) -> list[QgsLayerTreeGroup]:
    """Every CDIKT result group under ``node``, at any depth (an analyst may have moved them)."""
    return [g for g in node.findGroups(True) if g.customProperty(RESULT_GROUP_PROPERTY)]


def add_result_layers(result: Any, project: QgsProject | None = None,
                      canvas: QgsMapCanvas | None = None) -> QgsLayerTreeGroup:
    """Add a LocateResult's heatmap and candidates in a group named after the photo; zoom to rank 1.

    Earlier results are hidden and collapsed, not removed: two photos' candidates drawn at once
    read as one confusing set (and their labels crowd out the new #1), yet an analyst may still
    want to tick an old result back on to compare.
    """
    project = project or QgsProject.instance()
    heat = heatmap_layer(result.heatmap_path, "Similarity")
    cands = candidates_layer(result.gpkg_path, "Candidates", result.geojson_path)
    root = project.layerTreeRoot()
    for old in result_groups(root):
        old.setItemVisibilityChecked(False)
        old.setExpanded(False)
    group = root.insertGroup(0, Path(result.photo).name)
    group.setCustomProperty(RESULT_GROUP_PROPERTY, str(result.photo))
    group.setItemVisibilityChecked(True)
    group.setExpanded(True)
    layers = [cands, heat]  # candidates above the heatmap
    draped = (getattr(result, "extra", None) or {}).get("draped")
    if draped:  # the photo itself on the map, through its verified homography
        photo_layer = QgsRasterLayer(draped, "Photo (draped)", "gdal")
        if photo_layer.isValid():
            photo_layer.renderer().setOpacity(0.85)
            layers.insert(1, photo_layer)
    for layer in layers:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    if canvas is not None and result.candidates:
        zoom_to_candidate(canvas, result.candidates[0].polygon, result.crs_wkt, project)
    return group


def zoom_to_candidate(canvas: QgsMapCanvas, polygon: list[tuple[float, float]], crs_wkt: str,
                      project: QgsProject | None = None, context_factor: float = 4.0) -> QgsRectangle:
    """Centre the canvas on a footprint with some surroundings, whatever the canvas CRS."""
    xs = [p[0] for p in polygon]
    ys = [p[1] for p in polygon]
    rect = QgsRectangle(min(xs), min(ys), max(xs), max(ys))
    src = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
    dst = canvas.mapSettings().destinationCrs()
    if dst.isValid() and src.isValid() and dst != src:
        xform = QgsCoordinateTransform(src, dst, project or QgsProject.instance())
        rect = xform.transformBoundingBox(rect)
    rect.scale(context_factor)
    canvas.setExtent(rect)
    canvas.refresh()
    return rect


def export_candidates(layer_or_result: Any, path: str | os.PathLike[str]) -> str:
    """Copy the engine's RFC 7946 GeoJSON to ``path``; the plugin never re-encodes geometry.

    Accepts a LocateResult (anything with ``geojson_path``) or a candidates layer this plugin
    added (it remembers the GeoJSON in a custom property). The copy is atomic.
    """
    if isinstance(layer_or_result, QgsVectorLayer):
        source = layer_or_result.customProperty(GEOJSON_PROPERTY)
        if not source:
            raise ValueError(f"Layer '{layer_or_result.name()}' is not a CDIKT candidates layer.")
    else:
        source = getattr(layer_or_result, "geojson_path", None)
        if not source:
            raise ValueError("Nothing to export: no result yet.")
    source = str(source)
    if not os.path.isfile(source):
        raise ValueError(f"The result's GeoJSON is gone: {source}. Run Locate again.")
    dest = Path(path)
    if dest.suffix.lower() not in (".geojson", ".json"):
        dest = dest.with_suffix(".geojson")
    dest.parent.mkdir(parents=True, exist_ok=True)
    from model_backend.core.atomic import atomic_path  # torch-free
    from model_backend.core.errors import InputError

    try:
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
    except InputError as exc:  # the folder cannot be written: the caller's one-line message
        raise OSError(str(exc)) from None
    return str(dest)


FLAG_COLOURS = {"": "#2ca02c", "uncertain": "#ff9f1c", "outlier": "#d62728"}
"""Flight photos: on the track (green), unsure (orange), left out of the track (red)."""


def add_flight_layers(result: Any, project: QgsProject | None = None,
                      canvas: QgsMapCanvas | None = None) -> QgsLayerTreeGroup:
    """Add a FlightResult's track (a line) and photos (points coloured by flag) in a group; zoom to the track."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsLineSymbol, QgsMarkerSymbol, QgsRendererCategory

    project = project or QgsProject.instance()
    track = QgsVectorLayer(f"{result.gpkg_path}|layername=track", "Track", "ogr")
    photos = QgsVectorLayer(f"{result.gpkg_path}|layername=photos", "Photos", "ogr")
    if not (track.isValid() and photos.isValid()):
        raise ValueError(f"The flight's layers could not be opened from {result.gpkg_path}.")
    track.renderer().setSymbol(QgsLineSymbol.createSimple({"color": BEST_COLOUR, "width": "0.8",
                                                           "capstyle": "round"}))
    cats = [QgsRendererCategory(flag, QgsMarkerSymbol.createSimple({"name": "circle", "color": colour,
                                                                    "size": "2.6", "outline_color": "#202020"}),
                                flag or "on the track") for flag, colour in FLAG_COLOURS.items()]
    photos.setRenderer(QgsCategorizedSymbolRenderer("flag", cats))
    root = project.layerTreeRoot()
    for old in result_groups(root):
        old.setItemVisibilityChecked(False)
        old.setExpanded(False)
    folder = Path(result.csv_path).parent
    group = root.insertGroup(0, f"Flight {folder.name}")
    group.setCustomProperty(RESULT_GROUP_PROPERTY, str(folder))
    for layer in (photos, track):
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    if canvas is not None and track.featureCount():
        extent = track.extent()
        extent.grow(max(extent.width(), extent.height()) * 0.1 + 1.0)
        tr = QgsCoordinateTransform(track.crs(), canvas.mapSettings().destinationCrs(), project)
        canvas.setExtent(tr.transformBoundingBox(extent))
        canvas.refresh()
    return group

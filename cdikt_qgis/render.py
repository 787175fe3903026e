"""Render a result map to PNG without a display or a project (demo script, reports, tests).

Uses the same styling as the plugin (layers.py), so a demo picture looks like what an analyst
sees in QGIS. Rendering is synchronous (custom painter job), which keeps it deterministic in
scripts that have no running event loop.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qgis.core import (
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from .layers import candidates_layer, heatmap_layer, style_truth


def _truth_layer(truth_geojson: str, workdir: str) -> QgsVectorLayer:
    """A truth polygon from a GeoJSON file path or from GeoJSON text."""
    source = truth_geojson
    if truth_geojson.lstrip().startswith("{"):
        source = os.path.join(workdir, "truth.geojson")
        Path(source).write_text(truth_geojson, encoding="utf-8")
    layer = QgsVectorLayer(source, "Truth", "ogr")
    if not layer.isValid():
        raise ValueError(f"QGIS cannot open the truth GeoJSON {truth_geojson[:200]}")
    style_truth(layer)
    return layer


def render_png(raster_path: str, heatmap_path: str | None, matches_path: str | None, out_png: str,
               width: int = 1200, truth_geojson: str | None = None) -> str:
    """Draw raster, heatmap, ranked footprints and optional truth to ``out_png``; return its path.

    Extent and destination CRS are the raster's, so nothing is reprojected except vectors in
    another CRS (the RFC 7946 GeoJSON is WGS84). Height follows the raster's aspect ratio. The
    PNG is written to a temporary name and renamed, so a reader never sees half a file.
    """
    if width < 16:
        raise ValueError(f"width must be at least 16 pixels, got {width}")
    raster = QgsRasterLayer(str(raster_path), Path(raster_path).stem, "gdal")
    if not raster.isValid():
        raise ValueError(f"QGIS cannot open the raster {raster_path}")
    extent = raster.extent()
    height = max(1, round(width * extent.height() / extent.width()))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="cdikt-render-") as workdir:
        layers = []  # top first
        if truth_geojson:
            layers.append(_truth_layer(truth_geojson, workdir))
        if matches_path:
            layers.append(candidates_layer(str(matches_path)))
        if heatmap_path:
            layers.append(heatmap_layer(str(heatmap_path)))
        layers.append(raster)

        settings = QgsMapSettings()
        settings.setLayers(layers)
        settings.setDestinationCrs(raster.crs())
        settings.setOutputSize(QSize(width, height))
        settings.setOutputDpi(96)
        settings.setExtent(extent)
        settings.setBackgroundColor(QColor("white"))
        settings.setFlag(QgsMapSettings.Antialiasing, True)
        settings.setFlag(QgsMapSettings.DrawLabeling, True)

        image = QImage(QSize(width, height), QImage.Format_ARGB32_Premultiplied)
        image.fill(QColor("white"))
        painter = QPainter(image)
        try:
            job = QgsMapRendererCustomPainterJob(settings, painter)
            job.renderSynchronously()
        finally:
            painter.end()
        errors = job.errors()
        if errors:
            raise RuntimeError("Rendering failed: " + "; ".join(f"{e.layerID}: {e.message}" for e in errors))

        from model_backend.core.atomic import atomic_path  # torch-free

        with atomic_path(out) as tmp:
            if not image.save(tmp, "PNG"):
                raise OSError(f"Could not write {out}")
    return str(out)

"""Style the layers Processing loads when an algorithm finishes, as the dock styles its own.

Processing loads output layers itself (main thread, after the run) and then calls the
post-processor attached to each one. It does not keep the Python object alive, so each styler
is a module-level singleton: a collected post-processor would crash QGIS when called.
"""

from __future__ import annotations

from qgis.core import (
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsVectorLayer,
)

from ..layers import style_candidates, style_heatmap


class HeatmapStyler(QgsProcessingLayerPostProcessorInterface):
    """Semi-transparent viridis over the heatmap's own score range (layers.style_heatmap)."""

    _instance: HeatmapStyler | None = None

    @classmethod
    def instance(cls) -> HeatmapStyler:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802 (QGIS API)
                         feedback: QgsProcessingFeedback) -> None:
        if isinstance(layer, QgsRasterLayer) and layer.isValid():
            style_heatmap(layer)


class MatchesStyler(QgsProcessingLayerPostProcessorInterface):
    """Outline footprints labelled by rank, the best one red (layers.style_candidates)."""

    _instance: MatchesStyler | None = None

    @classmethod
    def instance(cls) -> MatchesStyler:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> None:
        if isinstance(layer, QgsVectorLayer) and layer.isValid():
            style_candidates(layer)

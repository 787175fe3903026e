"""Build tile index: embed every tile of a raster once, ahead of any photo.

Worth running on its own when a big raster should be ready before the photos arrive (overnight,
on a GPU box, in a model): every later locate with the same raster, footprint, stride and model
reuses the index from the cache instead of re-embedding the raster.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
)

from .common import MODEL_HELP, CdiktAlgorithm, EngineFeedback, engine_errors, import_engine

INDEX_DIR = "INDEX_DIR"
TILES = "TILES"
ANN = "ANN"
ANN_FILE = "ANN_FILE"
ANN_MODES = ("auto", "on", "off")
"""As the CLI's --ann (model_backend.index.ann.ANN_MODES, kept torch-free here)."""


class BuildIndexAlgorithm(CdiktAlgorithm):
    """``cdikt:index`` — the engine's ``build_index``, as the CLI's ``index`` command calls it."""

    def name(self) -> str:
        return "index"

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return "Build tile index"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Cuts the raster into square tiles of <b>Tile footprint</b> metres on the ground (stepping by "
            "<b>Stride</b> x footprint) and embeds each one with the neural network, once. The index is stored "
            "in the cache and reused by <i>Locate drone photos</i> whenever raster, footprint, stride and model "
            "match, so locating is then fast. An interrupted build resumes where it stopped.</p>"
            "<p><b>Compressed index</b>: auto builds it for very large rasters (10^6 tiles and more), on "
            "always (at least 256 tiles), off never; locating then shortlists with it and re-scores exactly.</p>"
            "<p>Outputs: the index folder, the number of tiles embedded (tiles that are mostly nodata are "
            "skipped) and the compressed index file, if any.</p>" + MODEL_HELP
        )

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_raster_parameter()
        self.add_footprint_parameters("Tile footprint (m): ground size of one tile, about a photo's short side")
        self.addParameter(QgsProcessingParameterEnum(ANN, "Compressed index (for very large rasters)",
                                                     list(ANN_MODES), defaultValue=ANN_MODES[0],
                                                     usesStaticStrings=True))
        self.add_model_parameters()
        self.addOutput(QgsProcessingOutputFolder(INDEX_DIR, "Index folder"))
        self.addOutput(QgsProcessingOutputNumber(TILES, "Number of tiles"))
        self.addOutput(QgsProcessingOutputString(ANN_FILE, "Compressed index file (empty: none)"))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        inputs = self.inputs()
        bridge = EngineFeedback(feedback)
        import_engine()
        from model_backend.core.requests import IndexRequest
        from model_backend.index.build import index_raster

        with engine_errors():
            if bridge.cancel():  # cancelled before the start: do not even load the model
                from model_backend.core.errors import Cancelled

                raise Cancelled()
            request = IndexRequest(inputs.source.path, inputs.tiling(), inputs.model(), cache_dir=inputs.cache_dir,
                                   ann=self.parameterAsEnumString(parameters, ANN, context) or ANN_MODES[0])
            done = index_raster(request, progress=bridge.progress, cancel=bridge.cancel)
            idx, ann = done.index, done.ann_path
        bridge.feedback.pushInfo(f"Index of {idx.n_tiles} tiles ({idx.grid.footprint_m:g} m footprint): {idx.folder}"
                                 + (f"; compressed index {ann}" if ann else ""))
        return {INDEX_DIR: str(idx.folder), TILES: idx.n_tiles, ANN_FILE: ann or ""}

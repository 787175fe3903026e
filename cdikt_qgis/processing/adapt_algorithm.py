"""Adapt model: fine-tune the model on labelled pairs of a raster, as the CLI's `adapt` command does.

For batch runs and models (one adaptation per area, overnight) and for scripts through
`qgis_process run cdikt:adapt`. The labels are a polygon layer in the labels schema
(model_backend.learn.labels: footprint polygons with a `photo` path), e.g. the one the Label pairs
dialog keeps; the result is a new weights file (never an overwritten one), recorded in the model
registry so the dock's model picker lists it, and the before/after validation figure in the log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputBoolean,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterVectorLayer,
    QgsProviderRegistry,
)

from ..settings import engine_default_data_dir
from .common import MODEL_HELP, CdiktAlgorithm, EngineFeedback, engine_errors, import_engine

LABELS = "LABELS"
EPOCHS = "EPOCHS"
LOOK = "LOOK"
FLIGHT_PHOTOS = "FLIGHT_PHOTOS"
LOOKS = (("auto", "Auto: drop colour if the labelled pairs match better without it"), ("colour", "Keep colour"),
         ("luminance", "Drop colour (luminance only: e.g. crops that change from year to year)"))
OUTPUT = "OUTPUT"
TOP1_BEFORE = "TOP1_BEFORE"
TOP1_AFTER = "TOP1_AFTER"
USE = "USE"
MEDIAN_RANK_BEFORE = "MEDIAN_RANK_BEFORE"
MEDIAN_RANK_AFTER = "MEDIAN_RANK_AFTER"
VALIDATION = "VALIDATION"
LABEL_SUFFIXES = (".gpkg", ".geojson", ".json")


def labels_layer_default() -> str | None:
    """The project's CDIKT labelled pairs layer, so the dialog does not preselect the Candidates layer."""
    from qgis.core import QgsProject

    from ..labelling.store import LABELS_PROPERTY

    for layer in QgsProject.instance().mapLayers().values():
        if layer.customProperty(LABELS_PROPERTY):
            return layer.id()
    return None


def labels_file(layer: Any) -> str:
    """The file behind a labels layer (main thread): a GeoPackage or GeoJSON on disk, else a clear error."""
    uri = layer.source()
    path = QgsProviderRegistry.instance().decodeUri(layer.providerType(), uri).get("path") or uri.split("|")[0]
    if layer.providerType() != "ogr" or not os.path.isfile(path) or Path(path).suffix.lower() not in LABEL_SUFFIXES:
        raise QgsProcessingException(
            f"'{layer.name()}' is not a labels GeoPackage or GeoJSON file; save the labels layer as one first.")
    return str(Path(path).resolve())


class AdaptModelAlgorithm(CdiktAlgorithm):
    """``cdikt:adapt`` — the engine's ``adapt``: raster + labels + model → new model file, before/after figures."""

    _labels: str | None = None

    def name(self) -> str:
        return "adapt"

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return "Adapt model to labelled pairs"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Fine-tunes the model on a few drone photos whose place on the raster is known, so it matches "
            "this imagery better (another year, season or sensor). <b>Labels</b>: a polygon layer with one "
            "footprint per photo and the photo's path in a <i>photo</i> field (the Label pairs dialog makes "
            "one). Some labelled pairs are held out: before and after adapting, the log gives where the true "
            "place of each held-out photo ranks among the raster's candidates (top-1 rate, median rank).</p>"
            "<p>On CPU only the network's last stage is trained (a few minutes). The result is a <b>new</b> "
            ".safetensors file (an existing file is never overwritten), also listed in the dock's model "
            "picker; the raster is re-indexed with it.</p>"
            "<p><b>Colour</b>: across years crops change colour field by field; the adapted model can ignore "
            "colour and see luminance only. <i>Auto</i> does so when the training pairs match better "
            "without it.</p>"
            "<p><b>Learn from the rest of the flight</b>: the other photos in the labelled photos' folders are "
            "located with the current model; those it places with confidence (by the shape of the ground) "
            "train as extra pairs, the others without labels. They never judge the new model: only your "
            "labels do.</p>" + MODEL_HELP
        )

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterVectorLayer(
            LABELS, "Labelled pairs (footprint polygons with a 'photo' field)", defaultValue=labels_layer_default()))
        self.addParameter(QgsProcessingParameterNumber(
            EPOCHS, "Epochs (0: the engine's default)", QgsProcessingParameterNumber.Integer,
            defaultValue=0, minValue=0, maxValue=200))
        self.addParameter(QgsProcessingParameterEnum(LOOK, "Colour", options=[text for _, text in LOOKS],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(
            FLIGHT_PHOTOS, "Learn from the other photos in the labelled photos' folders", defaultValue=True))
        self.add_model_parameters()
        self.addParameter(QgsProcessingParameterFileDestination(
            OUTPUT, "Adapted model", "Safetensors weights (*.safetensors)"))
        for key, text in ((TOP1_BEFORE, "Top-1 rate before"), (TOP1_AFTER, "Top-1 rate after"),
                          (MEDIAN_RANK_BEFORE, "Median rank before"), (MEDIAN_RANK_AFTER, "Median rank after")):
            self.addOutput(QgsProcessingOutputNumber(key, text))
        self.addOutput(QgsProcessingOutputString(VALIDATION, "Validation figures (JSON)"))
        self.addOutput(QgsProcessingOutputBoolean(USE, "Use the adapted model (the keep-or-reject decision)"))

    def read_more_inputs(self, parameters: dict[str, Any], context: QgsProcessingContext) -> None:
        layer = self.parameterAsVectorLayer(parameters, LABELS, context)
        if layer is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, LABELS))
        self._labels = labels_file(layer)

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        inputs = self.inputs()
        out = self.parameterAsFileOutput(parameters, OUTPUT, context)
        if not out.lower().endswith(".safetensors"):
            out += ".safetensors"
        epochs = self.parameterAsInt(parameters, EPOCHS, context)
        look = LOOKS[self.parameterAsEnum(parameters, LOOK, context)][0]
        flight_photos = self.parameterAsBoolean(parameters, FLIGHT_PHOTOS, context)
        bridge = EngineFeedback(feedback)
        import_engine()
        from model_backend.core.errors import Cancelled
        from model_backend.core.requests import AdaptRequest
        from model_backend.learn.adapt import adapt_model

        with engine_errors():
            if bridge.cancel():
                raise Cancelled()
            request = AdaptRequest(inputs.source.path, self._labels or "", out, inputs.model(),
                                   cache_dir=inputs.cache_dir, epochs=epochs or None, look=look,
                                   flight_photos=flight_photos, data_dir=engine_default_data_dir())
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            res = adapt_model(request, progress=bridge.progress, cancel=bridge.cancel)
        figures = res.to_dict()
        feedback.pushInfo(f"Trained: {res.trained_part}, on {res.n_train} pairs; {len(res.held_out)} held out; "
                          f"{figures['pseudo_pairs']} of {figures['pseudo_tried']} other photos of the flight placed "
                          "with confidence and trained as extra pairs.")
        feedback.pushInfo(f"Before: top-1 {res.before.top1:.0%}, median rank {res.before.median_rank:g}; "
                          f"after: top-1 {res.after.top1:.0%}, median rank {res.after.median_rank:g}.")
        feedback.pushInfo(json.dumps({"before": figures["before"], "after": figures["after"],
                                      "decision": figures["decision"]}))
        verdict = ("Use it: better, pair by pair, on photos it did not train on." if res.use else
                   "Keep the current model: the adapted one is not better by the margin on photos it did not "
                   "train on (see the decision's ranks per pair).")
        feedback.pushInfo(verdict)
        return {OUTPUT: res.out, TOP1_BEFORE: res.before.top1, TOP1_AFTER: res.after.top1,
                MEDIAN_RANK_BEFORE: res.before.median_rank, MEDIAN_RANK_AFTER: res.after.median_rank,
                VALIDATION: json.dumps(figures), USE: res.use}

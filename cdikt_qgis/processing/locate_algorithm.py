"""Locate drone photos: one photo or a whole folder against one raster, in one run.

Batch is the point: the model is loaded once and the raster's tile index is built (or taken
from the cache) once, then every photo costs only its own query. All candidates go into one
matches layer with the photo's name on each feature, so a flight's worth of photos can be
filtered, joined or exported together; each photo keeps its own heatmap GeoTIFF.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsPointXY,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputMultipleLayers,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingUtils,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from ..settings import CdiktSettings
from .common import MODEL_HELP, CdiktAlgorithm, EngineFeedback, engine_errors, import_engine, one_line
from .postprocess import HeatmapStyler, MatchesStyler

PHOTOS = "PHOTOS"
FROM_EXIF = "FOOTPRINT_FROM_EXIF"
TOLERANCE = "FOOTPRINT_TOLERANCE"
VERIFY = "VERIFY"
STRUCTURE = "STRUCTURE"
NEAR_GPS = "NEAR_GPS_M"
TOP_K = "TOP_K"
ROTATIONS = "ROTATIONS"
HEATMAPS = "HEATMAPS"
OUTPUT = "OUTPUT"
HEATMAP_LAYERS = "HEATMAP_LAYERS"
LOCATED = "LOCATED"
FAILED = "FAILED"

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def expand_photos(entries: list[str]) -> list[str]:
    """Files as given, folders as the photos directly inside them (sorted); anything missing is an error.

    Our own heatmaps are skipped so a heatmap folder inside the photo folder is not searched as photos.
    """
    photos: list[str] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted((q for q in p.iterdir() if q.is_file() and q.suffix.lower() in PHOTO_SUFFIXES
                            and not q.name.lower().endswith(".heatmap.tif")), key=lambda q: q.name.lower())
            if not found:
                raise QgsProcessingException(f"No photos ({', '.join(PHOTO_SUFFIXES)}) in the folder {p}.")
            photos.extend(str(q.resolve()) for q in found)
        elif p.is_file():
            photos.append(str(p.resolve()))
        else:
            raise QgsProcessingException(f"Photo not found: {p}. Check the path.")
    if not photos:
        raise QgsProcessingException("Pick at least one drone photo, or a folder of photos.")
    return list(dict.fromkeys(photos))


def _file_path(uri: str) -> Path | None:
    """The file behind a plain output path; None for memory layers and provider URIs."""
    return Path(uri) if uri and os.path.isabs(uri) and "|" not in uri else None


def _make_folders(*folders: Path) -> None:
    """Create output folders up front: GDAL will not create the folder of a new GeoPackage."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QgsProcessingException(f"Cannot create the folder {folder} ({exc.strerror}); choose another.") \
                from None


PROCESSING_ONLY_FIELDS = {"heatmap": str, "photo_path": str}
"""After the engine's MATCH_FIELDS: where each photo's heatmap is, and the photo's full path."""
QVARIANT_OF = {int: QVariant.Int, float: QVariant.Double, str: QVariant.String, bool: QVariant.Bool}


def matches_fields() -> QgsFields:
    """The engine's one matches schema (locate.export.MATCH_FIELDS, as in its GeoJSON and GeoPackage),
    then the Processing-only fields."""
    from model_backend.locate.export import MATCH_FIELDS  # torch-free

    fields = QgsFields()
    for name, kind in {**MATCH_FIELDS, **PROCESSING_ONLY_FIELDS}.items():
        fields.append(QgsField(name, QVARIANT_OF[kind]))
    return fields


class LocatePhotosAlgorithm(CdiktAlgorithm):
    """``cdikt:locate`` — the engine's ``locate_photo`` per photo, as the CLI's ``locate`` command does."""

    _photos: list[str] | None = None

    def name(self) -> str:
        return "locate"

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return "Locate drone photos"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Finds where each drone photo was taken on the raster. Give one photo, several, or a folder "
            "(every .jpg/.png/.tif directly inside it).</p>"
            "<p><b>Photo footprint</b>: the ground size (m) of a photo's short side; it is also the tile size. "
            "With <b>Use EXIF footprint</b> ticked, a photo's EXIF (altitude, focal length) sets it when present, "
            "else 0.6x, 1x and 1.6x the footprint are tried. <b>Footprint tolerance</b> (%): how far the footprint "
            "given or read from EXIF may be off; the sizes /(1+t), x1 and x(1+t) are searched and the best is "
            "used and reported (0: exactly the size given). <b>Number of candidates</b>: distinct places kept "
            "per photo. <b>Headings</b> (advanced): rotations tried for photos of unknown heading. "
            "<b>Verify footprints</b>: local features turn the best tiles into the photo's real footprint, with "
            "a confidence and heading (skipped for oblique photos). <b>Near GPS</b>: only tiles this close to "
            "the photo's EXIF position are scored (0: the whole raster).</p>"
            "<p>Outputs: one similarity heatmap GeoTIFF per photo (&lt;photo&gt;.heatmap.tif, in the raster's "
            "CRS, nodata outside coverage) in the heatmaps folder (by default &lt;matches&gt;_heatmaps beside the "
            "matches file), next to each photo's RFC 7946 GeoJSON; and "
            "one <b>Matches</b> layer holding every photo's candidate footprints, with the photo's name, rank "
            "and score on each feature. With several photos, a photo that fails is reported and skipped.</p>"
            + MODEL_HELP
        )

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterMultipleLayers(
            PHOTOS, "Drone photos (files, or folders of photos)", QgsProcessing.TypeFile))
        self.add_footprint_parameters("Photo footprint (m): ground size of a photo's short side")
        self.addParameter(QgsProcessingParameterBoolean(
            FROM_EXIF, "Use EXIF footprint when the photo has one (else try 0.6x / 1x / 1.6x)",
            defaultValue=CdiktSettings().footprint_from_exif))  # as the dock's "Auto" footprint box
        self.addParameter(QgsProcessingParameterNumber(
            TOLERANCE, "Footprint tolerance (%): sizes this far around the footprint are searched too",
            QgsProcessingParameterNumber.Double, defaultValue=CdiktSettings().footprint_tolerance_pct,
            minValue=0.0, maxValue=100.0))
        self.addParameter(QgsProcessingParameterNumber(
            TOP_K, "Number of candidates per photo", QgsProcessingParameterNumber.Integer,
            defaultValue=CdiktSettings.DEFAULT_TOP_K, minValue=1, maxValue=100))
        rotations = QgsProcessingParameterNumber(
            ROTATIONS, "Headings tried per photo", QgsProcessingParameterNumber.Integer,
            defaultValue=8, minValue=1, maxValue=72)
        rotations.setFlags(rotations.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(rotations)
        self.addParameter(QgsProcessingParameterBoolean(
            VERIFY, "Verify footprints (local features; skipped for oblique photos)", defaultValue=True))
        self.addParameter(QgsProcessingParameterBoolean(
            STRUCTURE, "Re-rank by the ground's structure (field edges, roads: for a map of another year)",
            defaultValue=True))
        self.addParameter(QgsProcessingParameterNumber(
            NEAR_GPS, "Near GPS (m): search only this close to the photo's EXIF position (0: anywhere)",
            QgsProcessingParameterNumber.Double, defaultValue=0.0, minValue=0.0))
        self.add_model_parameters()
        # optional so scripts may leave it out (`qgis_process run cdikt:locate -- RASTER=… PHOTOS=… OUTPUT=…`):
        # the heatmaps then go beside the matches file, where they outlive qgis_process's temporary folder
        self.addParameter(QgsProcessingParameterFolderDestination(
            HEATMAPS, "Heatmaps folder (empty: <matches>_heatmaps beside the matches file)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink(OUTPUT, "Matches", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputMultipleLayers(HEATMAP_LAYERS, "Heatmaps"))
        self.addOutput(QgsProcessingOutputNumber(LOCATED, "Photos located"))
        self.addOutput(QgsProcessingOutputNumber(FAILED, "Photos that failed"))

    def read_more_inputs(self, parameters: dict[str, Any], context: QgsProcessingContext) -> None:
        self._photos = expand_photos(self.parameterAsFileList(parameters, PHOTOS, context))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        inputs = self.inputs()
        photos = self._photos or []
        bridge = EngineFeedback(feedback)
        import_engine()
        from model_backend.core.config import QueryConfig
        from model_backend.core.errors import Cancelled, CdiktError
        from model_backend.core.paths import output_names
        from model_backend.core.requests import LocateRequest
        from model_backend.geo.raster import open_raster
        from model_backend.locate.pipeline import locate
        from model_backend.nn.embedder import EmbeddingModel

        with engine_errors():
            if bridge.cancel():  # cancelled before the start: load nothing, write nothing
                raise Cancelled()
            open_raster(inputs.source.path)  # a bad raster fails before the model loads
            net = EmbeddingModel.load(inputs.weights, inputs.device)

        matches_file = _file_path(self.parameterAsOutputLayer(parameters, OUTPUT, context))
        root = self.parameterAsFileOutput(parameters, HEATMAPS, context) or (
            str(matches_file.with_name(f"{matches_file.stem}_heatmaps")) if matches_file else
            self.parameterDefinition(HEATMAPS).generateTemporaryDestination())
        _make_folders(Path(root), *([matches_file.parent] if matches_file else []))
        sink, dest_id = self.parameterAsSink(parameters, OUTPUT, context, matches_fields(), QgsWkbTypes.Polygon,
                                             inputs.crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, OUTPUT))
        query = QueryConfig(top_k=self.parameterAsInt(parameters, TOP_K, context),
                            rotations=self.parameterAsInt(parameters, ROTATIONS, context),
                            footprint_m=None if self.parameterAsBoolean(parameters, FROM_EXIF, context)
                            else inputs.footprint_m,
                            footprint_tolerance=self.parameterAsDouble(parameters, TOLERANCE, context) / 100.0,
                            structure=self.parameterAsBoolean(parameters, STRUCTURE, context))
        base = LocateRequest(  # the dock and the CLI build the same request; only photo and folder vary here
            inputs.source.path, "", root, tiling=inputs.tiling(), query=query, model=inputs.model(),
            cache_dir=inputs.cache_dir,
            verify=None if self.parameterAsBoolean(parameters, VERIFY, context) else False,  # None: if nadir enough
            prior_radius_m=self.parameterAsDouble(parameters, NEAR_GPS, context) or None)
        heatmaps: list[tuple[str, str]] = []
        failures: list[str] = []
        for i, (photo, out_name) in enumerate(zip(photos, output_names(photos))):
            part = bridge.part(i, len(photos))
            name = Path(photo).name
            feedback.pushInfo(f"Photo {i + 1} of {len(photos)}: {name}")
            try:
                res = locate(replace(base, photo=photo, out_name=out_name), progress=part.progress,
                             cancel=part.cancel, embedder=net)
            except Cancelled as exc:
                raise QgsProcessingException(one_line(exc)) from None
            except CdiktError as exc:
                if len(photos) == 1:
                    raise QgsProcessingException(one_line(exc)) from None
                failures.append(f"{name}: {one_line(exc)}")
                feedback.reportError(failures[-1], False)
                continue
            self._write_matches(sink, res)
            heatmaps.append((res.heatmap_path, name))
            best = res.best
            feedback.pushInfo(f"{name}: best at lat {best.lat:.6f}, lon {best.lon:.6f} (score {best.score:.3f}, "
                              f"footprint {res.footprint_note()}) in {res.seconds:.1f} s")
        if not heatmaps:
            raise QgsProcessingException(failures[0] if failures else "No photo was located.")
        self._load_on_completion(context, dest_id, heatmaps)
        return {OUTPUT: dest_id, HEATMAPS: root, HEATMAP_LAYERS: [p for p, _ in heatmaps],
                LOCATED: len(heatmaps), FAILED: len(failures)}

    @staticmethod
    def _write_matches(sink: QgsFeatureSink, res: Any) -> None:
        """One feature per candidate, geometry in the raster's CRS as the engine computed it."""
        from model_backend.locate.export import match_properties, source_crs_label

        fields = matches_fields()
        label = source_crs_label(res.crs_wkt)
        for c in res.candidates:
            props = {**match_properties(c, label, res.properties), "heatmap": res.heatmap_path,
                     "photo_path": str(res.photo)}
            feat = QgsFeature(fields)
            feat.setAttributes([props.get(f.name()) for f in fields])
            feat.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(float(p[0]), float(p[1])) for p in c.polygon]]))
            if not sink.addFeature(feat, QgsFeatureSink.FastInsert):
                raise QgsProcessingException(f"Could not write the matches of {Path(res.photo).name}.")

    @staticmethod
    def _load_on_completion(context: QgsProcessingContext, dest_id: str, heatmaps: list[tuple[str, str]]) -> None:
        """Heatmaps load (styled) when the matches layer does: the user's "open output" choice decides both."""
        if not context.willLoadLayerOnCompletion(dest_id):
            return
        context.layerToLoadOnCompletionDetails(dest_id).setPostProcessor(MatchesStyler.instance())
        project = context.layerToLoadOnCompletionDetails(dest_id).project or context.project()
        if project is None:
            return
        for path, name in heatmaps:
            details = QgsProcessingContext.LayerDetails(f"{name} similarity", project, HEATMAPS,
                                                        QgsProcessingUtils.LayerHint.Raster)
            details.setPostProcessor(HeatmapStyler.instance())
            context.addLayerToLoadOnCompletion(path, details)

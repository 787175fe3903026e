"""Locate a flight: a folder of photos becomes a track (the engine's ``locate_flight``, as the CLI's
``locate-flight``). Every photo keeps its own locate outputs; the flight adds a Track layer (a line
through the places the sequence chose, M = seconds) and a Photos layer (one point per photo: the
chosen place, the photo's own best, confidence and flag)."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingUtils,
)

from ..settings import CdiktSettings
from .common import MODEL_HELP, CdiktAlgorithm, EngineFeedback, engine_errors, import_engine
from .locate_algorithm import FROM_EXIF, NEAR_GPS, PHOTOS, STRUCTURE, TOLERANCE, VERIFY, expand_photos

MAX_SPEED = "MAX_SPEED"
INTERVAL = "INTERVAL_S"
STATES = "STATES"
USE_GPS = "USE_GPS"
MOTION = "MOTION"
LOG = "FLIGHT_LOG"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
TRACK = "TRACK"
PHOTO_POINTS = "PHOTO_POINTS"
CSV = "CSV"
LOCATED = "LOCATED"
OUTLIERS = "OUTLIERS"
FAILED = "FAILED"


class LocateFlightAlgorithm(CdiktAlgorithm):
    """``cdikt:locate_flight`` — ``model_backend.locate.flight.run.locate_flight`` with the CLI's options."""

    _photos: list[str] | None = None

    def name(self) -> str:
        return "locate_flight"

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return "Locate a flight (photos as a track)"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Locates a whole flight: every photo as <i>Locate drone photos</i> does, then the sequence "
            "together. Photos are ordered by their EXIF time (or the flight log's), else by name. Alone, a photo "
            "over a uniform field or another year's crops is ambiguous; beside its neighbours, taken seconds "
            "before and after, it is not: the track chooses, among each photo's best places, the path a drone "
            "could have flown (<b>Top speed</b>), agreeing with the move measured between consecutive photos "
            "(<b>Match consecutive photos</b>). A photo that fits no place near its neighbours is flagged "
            "<i>outlier</i> and keeps its own best place; one the track is unsure of is flagged <i>uncertain</i>."
            "</p><p>Outputs, in the output folder: each photo's heatmap and matches, <b>flight.gpkg</b> with the "
            "<b>Track</b> (a line through the chosen places, M = seconds since the first photo) and <b>Photos</b> "
            "(chosen place, the photo's own best, confidence, flag) layers, and <b>flight.csv</b>. Running again "
            "into the same folder reuses the photos already located (a cancelled run resumes).</p>"
            + MODEL_HELP
        )

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterMultipleLayers(
            PHOTOS, "The flight's photos (a folder, or files)", QgsProcessing.TypeFile))
        self.add_footprint_parameters("Photo footprint (m): ground size of a photo's short side")
        settings = CdiktSettings()
        self.addParameter(QgsProcessingParameterBoolean(
            FROM_EXIF, "Use EXIF footprint when the photo has one", defaultValue=settings.footprint_from_exif))
        self.addParameter(QgsProcessingParameterNumber(
            TOLERANCE, "Footprint tolerance (%)", QgsProcessingParameterNumber.Double,
            defaultValue=settings.footprint_tolerance_pct, minValue=0.0, maxValue=100.0))
        self.addParameter(QgsProcessingParameterNumber(
            MAX_SPEED, "Top speed of the drone (m/s)", QgsProcessingParameterNumber.Double,
            defaultValue=20.0, minValue=0.1))
        self.addParameter(QgsProcessingParameterBoolean(
            USE_GPS, "Use the photos' GPS positions as a prior", defaultValue=True))
        self.addParameter(QgsProcessingParameterBoolean(
            VERIFY, "Verify footprints (local features; skipped for oblique photos)", defaultValue=True))
        self.addParameter(QgsProcessingParameterBoolean(
            STRUCTURE, "Re-rank each photo by the ground's structure (about 1.5 s a photo; the track does "
            "much of that work)", defaultValue=False))
        self.addParameter(QgsProcessingParameterFile(
            LOG, "Flight log CSV (UAV-VisLoc columns: filename, date, lat, lon, height, Phi1)",
            QgsProcessingParameterFile.File, optional=True, fileFilter="CSV (*.csv);;All files (*)"))
        advanced = [
            QgsProcessingParameterBoolean(MOTION, "Match consecutive photos to measure the moves between them",
                                          defaultValue=True),
            QgsProcessingParameterNumber(INTERVAL, "Seconds between photos when they carry no time",
                                         QgsProcessingParameterNumber.Double, defaultValue=3.0, minValue=0.01),
            QgsProcessingParameterNumber(STATES, "Places per photo the track may choose among",
                                         QgsProcessingParameterNumber.Integer, defaultValue=100, minValue=1,
                                         maxValue=1000),
            QgsProcessingParameterNumber(NEAR_GPS, "Near GPS (m): search only this close to each photo's GPS "
                                         "position (0: anywhere)", QgsProcessingParameterNumber.Double,
                                         defaultValue=0.0, minValue=0.0),
        ]
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.add_model_parameters()
        self.addParameter(QgsProcessingParameterFolderDestination(
            OUTPUT_FOLDER, "Output folder (each photo's outputs, flight.gpkg, flight.csv)"))
        self.addOutput(QgsProcessingOutputVectorLayer(TRACK, "Track", QgsProcessing.TypeVectorLine))
        self.addOutput(QgsProcessingOutputVectorLayer(PHOTO_POINTS, "Photos", QgsProcessing.TypeVectorPoint))
        self.addOutput(QgsProcessingOutputString(CSV, "Per-photo table (CSV)"))
        self.addOutput(QgsProcessingOutputNumber(LOCATED, "Photos located"))
        self.addOutput(QgsProcessingOutputNumber(OUTLIERS, "Photos flagged outlier"))
        self.addOutput(QgsProcessingOutputNumber(FAILED, "Photos that failed"))

    def read_more_inputs(self, parameters: dict[str, Any], context: QgsProcessingContext) -> None:
        self._photos = expand_photos(self.parameterAsFileList(parameters, PHOTOS, context))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        inputs = self.inputs()
        bridge = EngineFeedback(feedback)
        import_engine()
        from model_backend.core.config import QueryConfig
        from model_backend.core.errors import Cancelled
        from model_backend.core.requests import FlightRequest
        from model_backend.locate.flight.run import locate_flight

        out = self.parameterAsString(parameters, OUTPUT_FOLDER, context)
        query = QueryConfig(footprint_m=None if self.parameterAsBoolean(parameters, FROM_EXIF, context)
                            else inputs.footprint_m,
                            footprint_tolerance=self.parameterAsDouble(parameters, TOLERANCE, context) / 100.0,
                            structure=self.parameterAsBoolean(parameters, STRUCTURE, context))
        with engine_errors():
            if bridge.cancel():
                raise Cancelled()
            request = FlightRequest(
                inputs.source.path, tuple(self._photos or ()), out, tiling=inputs.tiling(), query=query,
                model=inputs.model(), cache_dir=inputs.cache_dir,
                verify=None if self.parameterAsBoolean(parameters, VERIFY, context) else False,
                prior_radius_m=self.parameterAsDouble(parameters, NEAR_GPS, context) or None,
                states=self.parameterAsInt(parameters, STATES, context),
                max_speed_m_s=self.parameterAsDouble(parameters, MAX_SPEED, context),
                interval_s=self.parameterAsDouble(parameters, INTERVAL, context),
                use_gps=self.parameterAsBoolean(parameters, USE_GPS, context),
                motion=self.parameterAsBoolean(parameters, MOTION, context),
                log=self.parameterAsFile(parameters, LOG, context) or None)
            res = locate_flight(request, progress=bridge.progress, cancel=bridge.cancel)
        for message in res.failed:
            feedback.reportError(message, False)
        outliers = sum(line["flag"] == "outlier" for line in res.lines)
        feedback.pushInfo(f"{len(res.lines)} photos located as one track (ordered by {res.order_source}); "
                          f"{outliers} flagged outlier, {res.reused} reused from an earlier run, "
                          f"decoded in {res.decode_seconds:.2f} s")
        track, points = f"{res.gpkg_path}|layername=track", f"{res.gpkg_path}|layername=photos"
        project = context.project()
        if project is not None:  # loaded when the run is asked to load its results (runAndLoadResults, dialog)
            for uri, name in ((points, "Flight photos"), (track, "Flight track")):
                details = QgsProcessingContext.LayerDetails(name, project, name, QgsProcessingUtils.LayerHint.Vector)
                context.addLayerToLoadOnCompletion(uri, details)
        return {OUTPUT_FOLDER: out, TRACK: track, PHOTO_POINTS: points, CSV: res.csv_path,
                LOCATED: len(res.lines), OUTLIERS: outliers, FAILED: len(res.failed)}


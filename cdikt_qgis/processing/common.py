"""What the CDIKT algorithms share: parameters, engine bridge, error wording.

The algorithms must behave like the dock and the CLI (same engine calls, same one-line
messages), so everything that could drift between them lives here once: the raster is captured
on the main thread (``prepareAlgorithm``) with the dock's own ``capture_raster``, settings are
read there too, and the worker only hands plain values to ``model_backend``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsMapLayer,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProject,
    QgsRasterLayer,
)

from ..engine_task import NO_TORCH_ADVICE
from ..settings import CdiktSettings
from ..tasks import LayerError, RasterSource, capture_raster

RASTER = "RASTER"
FOOTPRINT = "FOOTPRINT"
STRIDE = "STRIDE"
WEIGHTS = "WEIGHTS"
DEVICE = "DEVICE"
CACHE_DIR = "CACHE_DIR"
DEVICES = ("auto", "cpu", "cuda")
HELP_URL = "https://github.com/cdikt-qgis/cdikt-qgis"


MODEL_HELP = (
    "<p><b>Model weights</b>: a .pt/.pth/.safetensors file; empty uses the plugin setting, else the embedded "
    "default model. <b>Device</b>: auto uses CUDA when present. <b>Cache folder</b>: where tile indexes are "
    "kept (empty: plugin setting, else $CDIKT_CACHE_DIR or ~/.cache/cdikt-qgis); an index built once for a "
    "raster, footprint, stride and model is reused by every later run.</p>"
)


@dataclass(frozen=True)
class EngineInputs:
    """Parameters and settings resolved on the main thread, safe to carry into the worker."""

    source: RasterSource
    crs: QgsCoordinateReferenceSystem
    footprint_m: float
    stride: float
    weights: str | None
    device: str
    cache_dir: str | None

    def tiling(self) -> Any:
        from model_backend.core.config import TilingConfig

        return TilingConfig(footprint_m=self.footprint_m, stride=self.stride)

    def model(self) -> Any:
        from model_backend.core.config import ModelConfig

        return ModelConfig(weights=self.weights, device=self.device)


class EngineFeedback:
    """Processing's feedback as the engine's ``progress``/``cancel`` callables, over a share of the bar.

    A batch of photos gives each photo its own slice of the progress bar; the text is only sent
    when it changes, so the log shows steps rather than one line per progress tick.
    """

    def __init__(self, feedback: QgsProcessingFeedback | None, start: float = 0.0, end: float = 1.0) -> None:
        self.feedback = feedback if feedback is not None else QgsProcessingFeedback()
        self.start = start
        self.end = end
        self._last = ""

    def progress(self, fraction: float, message: str) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.feedback.setProgress(100.0 * (self.start + (self.end - self.start) * f))
        if message and message != self._last:
            self._last = message
            self.feedback.setProgressText(message)

    def cancel(self) -> bool:
        return self.feedback.isCanceled()

    def part(self, i: int, n: int) -> EngineFeedback:
        """The slice of the bar for item ``i`` of ``n``."""
        span = (self.end - self.start) / max(n, 1)
        return EngineFeedback(self.feedback, self.start + i * span, self.start + (i + 1) * span)


def one_line(exc: BaseException) -> str:
    """The engine's messages are written for the user; show the first line only, never a traceback."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def engine_errors() -> Iterator[None]:
    """Turn the engine's user-facing errors (CdiktError, Cancelled included) into QgsProcessingException."""
    from model_backend.core.errors import CdiktError

    try:
        yield
    except CdiktError as exc:
        raise QgsProcessingException(one_line(exc)) from None


def import_engine() -> None:
    """Import torch and the engine now, so a missing torch is install advice rather than a traceback."""
    try:
        # Not torchvision: the default model does without it (`nn.mobilenet`), and its import alone costs
        # seconds; the architectures that need it (timm's) say so when they are loaded.
        import model_backend.locate.pipeline  # noqa: F401 (imports torch)
    except ImportError as exc:
        missing = (getattr(exc, "name", "") or "").split(".")[0]
        if missing in ("torch", "torchvision", "timm"):
            raise QgsProcessingException(f"{NO_TORCH_ADVICE} ({exc})") from None
        raise QgsProcessingException(
            f"The CDIKT engine could not be imported ({exc}); a package in QGIS's Python may shadow one torch "
            "needs (check the cdikt/python_site_packages setting).") from None


OUTPUT_SUFFIXES = (".heatmap.tif", ".draped.tif")
"""The engine's raster outputs (heatmap, draped photo): never a raster to search in."""


def is_cdikt_output(layer: QgsMapLayer) -> bool:
    """A layer this plugin produced: a heatmap or draped photo (by file name), or a candidates layer."""
    if layer.customProperty("cdikt/geojson_path"):
        return True
    source = (layer.source() or "").split("|")[0].lower()
    return source.endswith(OUTPUT_SUFFIXES)


def search_raster_default() -> str | None:
    """The layer id Processing dialogs preselect as the raster to search: the active raster layer if it
    is not one of ours, else the first raster of the project that is not; None with no project (scripts)."""
    from qgis.utils import iface  # None under qgis_process and in tests

    candidates: list[QgsMapLayer] = []
    active = iface.activeLayer() if iface is not None else None
    if active is not None:
        candidates.append(active)
    candidates += [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    for layer in candidates:
        if isinstance(layer, QgsRasterLayer) and layer.isValid() and not is_cdikt_output(layer):
            return layer.id()
    return None


def snap_stride(stride: float) -> float:
    """The engine needs a stride of exactly 1/n; accept 0.33 for 1/3 instead of failing on rounding."""
    if stride > 0:
        k = round(1.0 / stride)
        if k >= 1 and abs(1.0 / k - stride) <= 0.01:
            return 1.0 / k
    return stride  # the engine explains what is wrong with it


class CdiktAlgorithm(QgsProcessingAlgorithm):
    """Base of the CDIKT algorithms: shared parameters, help link, torch check, main-thread capture."""

    _inputs: EngineInputs | None = None
    _input_error: str | None = None

    def createInstance(self) -> QgsProcessingAlgorithm:  # noqa: N802 (QGIS API)
        return type(self)()

    def helpUrl(self) -> str:  # noqa: N802
        return HELP_URL

    def canExecute(self) -> tuple[bool, str]:  # noqa: N802
        """Grey the algorithm out with install advice when torch cannot be found (cheap: no import)."""
        if importlib.util.find_spec("torch") is None:
            return False, f"{NO_TORCH_ADVICE} (No module named 'torch')"
        return True, ""

    # -- parameters ------------------------------------------------------------------------
    def add_raster_parameter(self) -> None:
        # initAlgorithm runs again for each dialog (QgsProcessingAlgorithm.create), so the default
        # follows the project: the raster the analyst works on, never one of our own outputs
        self.addParameter(QgsProcessingParameterRasterLayer(
            RASTER, "Raster to search in (orthophoto or satellite image, a local file)",
            defaultValue=search_raster_default()))

    def add_footprint_parameters(self, footprint_help: str) -> None:
        footprint = QgsProcessingParameterNumber(
            FOOTPRINT, footprint_help, QgsProcessingParameterNumber.Double,
            defaultValue=CdiktSettings.DEFAULT_FOOTPRINT_M, minValue=1.0)
        self.addParameter(footprint)
        stride = QgsProcessingParameterNumber(
            STRIDE, "Stride, as a fraction of the footprint (1/n: 1, 0.5, 0.333, 0.25)",
            QgsProcessingParameterNumber.Double, defaultValue=0.5, minValue=0.01, maxValue=1.0)
        stride.setFlags(stride.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(stride)

    def add_model_parameters(self) -> None:
        params = [
            QgsProcessingParameterFile(WEIGHTS, "Model weights (empty: plugin setting, else the embedded model)",
                                       QgsProcessingParameterFile.File, optional=True,
                                       fileFilter="Model weights (*.pt *.pth *.safetensors);;All files (*)"),
            QgsProcessingParameterEnum(DEVICE, "Device (auto: CUDA when present)", list(DEVICES),
                                       defaultValue=DEVICES[0], usesStaticStrings=True),
            QgsProcessingParameterFile(CACHE_DIR, "Cache folder for tile indexes (empty: plugin setting)",
                                       QgsProcessingParameterFile.Folder, optional=True),
        ]
        for p in params:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)

    def read_inputs(self, parameters: dict[str, Any], context: QgsProcessingContext) -> EngineInputs:
        """Main thread only: the layer and QgsSettings are not touched from the worker."""
        layer = self.parameterAsRasterLayer(parameters, RASTER, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, RASTER))
        try:
            source = capture_raster(layer)
        except LayerError as exc:
            raise QgsProcessingException(str(exc)) from None
        settings = CdiktSettings()
        return EngineInputs(
            source=source,
            crs=QgsCoordinateReferenceSystem(layer.crs()),
            footprint_m=self.parameterAsDouble(parameters, FOOTPRINT, context),
            stride=snap_stride(self.parameterAsDouble(parameters, STRIDE, context)),
            weights=self.parameterAsFile(parameters, WEIGHTS, context) or settings.weights_path,
            device=self.parameterAsEnumString(parameters, DEVICE, context) or DEVICES[0],
            cache_dir=self.parameterAsFile(parameters, CACHE_DIR, context) or settings.cache_dir,
        )

    def read_more_inputs(self, parameters: dict[str, Any], context: QgsProcessingContext) -> None:
        """Subclasses resolve their own inputs here (main thread, before the run)."""

    def prepareAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> bool:
        """Capture inputs on the main thread; a bad input is raised again from processAlgorithm.

        Processing reports an exception from prepareAlgorithm only through the feedback, and a
        script's processing.run() then raises a generic "There were errors executing the
        algorithm."; deferring it gives scripts and the GUI the same one-line message.
        """
        self._inputs, self._input_error = None, None
        try:
            self._inputs = self.read_inputs(parameters, context)
            self.read_more_inputs(parameters, context)
        except QgsProcessingException as exc:
            self._input_error = str(exc)
        return True

    def inputs(self) -> EngineInputs:
        """The prepared inputs, or the input error prepareAlgorithm met (see there)."""
        if self._input_error is not None:
            raise QgsProcessingException(self._input_error)
        if self._inputs is None:  # processAlgorithm without prepareAlgorithm: a programming error
            raise QgsProcessingException("Internal error: the algorithm was not prepared.")
        return self._inputs

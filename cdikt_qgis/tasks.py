"""Background work: a QgsTask that calls the engine, and what it needs captured beforehand.

Rule of the house (learnt from a peer that crashed on it): nothing in ``run()`` touches a QGIS
layer or provider. Everything about the layer is captured on the main thread into a plain
``RasterSource``; the worker hands file paths to ``model_backend``, which re-opens the file.
``model_backend`` (and so torch) is imported inside ``run()``, so QGIS starts fast and a
missing torch becomes a message, not a plugin that fails to load.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayer, QgsProviderRegistry, QgsRasterLayer

from .engine_task import EngineTask

log = logging.getLogger(__name__)


PROVIDER_KINDS = {"wms": "web layer (WMS/WMTS/XYZ)", "wcs": "web layer (WCS)", "arcgismapserver": "web layer (ArcGIS)",
                  "postgresraster": "database layer (PostGIS)"}
"""What a raster provider is, in words, for the one-line refusal (short: it must fit the message bar)."""


class LayerError(ValueError):
    """The chosen layer cannot be handed to the engine; the message is for the user."""


@dataclass(frozen=True)
class LocateParams:
    """What the dock collects; the controller turns it into a task."""

    layer: QgsMapLayer | None
    photo: str
    footprint_m: float
    footprint_auto: bool
    top_k: int
    verify: bool | None = None
    """None = verify when the photo looks down enough (the engine decides); False = never."""
    prior_radius_m: float | None = None


@dataclass(frozen=True)
class RasterSource:
    """Plain facts about a raster layer, safe to carry into a worker thread."""

    path: str
    crs_wkt: str
    name: str
    layer_id: str


def capture_raster(layer: QgsMapLayer | None) -> RasterSource:
    """Read path and CRS from a layer on the main thread; refuse anything that is not a local file."""
    if layer is None:
        raise LayerError("Pick a raster layer to search in.")
    if not isinstance(layer, QgsRasterLayer):
        raise LayerError(f"'{layer.name()}' is not a raster layer; pick an orthophoto or satellite raster.")
    if not layer.isValid():
        raise LayerError(f"Layer '{layer.name()}' is not valid (missing file?).")
    provider = layer.providerType()
    if provider != "gdal":
        kind = PROVIDER_KINDS.get(provider, f"{provider} layer")
        raise LayerError(f"'{layer.name()}' is a {kind}, not a file: save it as a GeoTIFF (Export > Save As…).")
    uri = layer.dataProvider().dataSourceUri() or layer.source()
    parts = QgsProviderRegistry.instance().decodeUri("gdal", uri)
    path = parts.get("path") or uri
    if not os.path.isfile(path):
        raise LayerError(
            f"'{layer.name()}' is not read from a local file ({uri[:120]}). Save it as a GeoTIFF first."
        )
    crs = layer.crs()
    if not crs.isValid():
        raise LayerError(
            f"'{layer.name()}' has no CRS; assign one (Raster > Projections > Assign Projection)."
        )
    return RasterSource(path=str(Path(path).resolve()), crs_wkt=crs.toWkt(), name=layer.name(),
                        layer_id=layer.id())


class LocateTask(EngineTask):
    """Index the raster (cached by the engine) and locate one photo in it (see EngineTask)."""

    def __init__(self, request: int, source: RasterSource, photo: str, out_dir: str, *,
                 footprint_m: float, footprint_auto: bool, top_k: int, cache_dir: str | None,
                 weights: str | None, on_done: Callable[[LocateTask], None] | None = None,
                 verify: bool | None = None, prior_radius_m: float | None = None) -> None:
        super().__init__(f"CDIKT: locating {Path(photo).name}", on_done)
        self.request = request
        self.source = source
        self.photo = photo
        self.out_dir = out_dir
        self.footprint_m = float(footprint_m)
        self.footprint_auto = bool(footprint_auto)
        self.top_k = int(top_k)
        self.cache_dir = cache_dir
        self.weights = weights
        self.verify = verify
        self.prior_radius_m = prior_radius_m
        self._start = time.perf_counter()

    def work(self) -> Any:
        from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig
        from model_backend.locate.pipeline import locate_photo

        self._start = time.perf_counter()
        os.makedirs(self.out_dir, exist_ok=True)
        self._progress(0.0, "Starting…")
        query_fp = None if self.footprint_auto else self.footprint_m
        return locate_photo(
            self.source.path, self.photo, self.out_dir,
            tiling=TilingConfig(footprint_m=self.footprint_m),
            query=QueryConfig(top_k=self.top_k, footprint_m=query_fp),
            model=ModelConfig(weights=self.weights),
            cache_dir=self.cache_dir, progress=self._progress, cancel=self.isCanceled,
            verify=self.verify, prior_radius_m=self.prior_radius_m,
        )

    def done_message(self) -> str:
        return f"Done in {time.perf_counter() - self._start:.1f} s"

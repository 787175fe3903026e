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

from model_backend.core.requests import FlightRequest as FLIGHT_DEFAULTS  # torch-free: the flight's defaults

from .engine_task import EngineTask
from .settings import CdiktSettings

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
    structure: bool = True
    """Re-rank the best candidates by the ground's shapes (QueryConfig.structure)."""
    prior_radius_m: float | None = None
    tolerance_pct: float = CdiktSettings.DEFAULT_TOLERANCE_PCT
    """How far (%) the typed or EXIF footprint may be off (QueryConfig.footprint_tolerance x 100)."""
    max_speed_m_s: float = FLIGHT_DEFAULTS.max_speed_m_s
    """Flights only: the track's top ground speed (FlightRequest.max_speed_m_s)."""
    motion: bool = FLIGHT_DEFAULTS.motion
    """Flights only: measure the move between consecutive photos (FlightRequest.motion)."""
    flight_log: str | None = None
    """Flights only: a UAV-VisLoc-style CSV log (FlightRequest.log)."""


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


def locate_request(params: LocateParams, source: RasterSource, out_dir: str, settings: Any) -> Any:
    """The engine's LocateRequest for what the dock collected: the same request the CLI and
    Processing build, so every option reaches the engine the same way."""
    from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig  # torch-free
    from model_backend.core.requests import LocateRequest

    return LocateRequest(
        source.path, params.photo, out_dir, tiling=TilingConfig(footprint_m=float(params.footprint_m)),
        query=QueryConfig(top_k=int(params.top_k), footprint_m=None if params.footprint_auto else params.footprint_m,
                          footprint_tolerance=float(params.tolerance_pct) / 100.0,
                          structure=bool(params.structure)),
        model=ModelConfig(weights=settings.weights_path), cache_dir=settings.cache_dir,
        verify=params.verify, prior_radius_m=params.prior_radius_m)


@dataclass(frozen=True)
class CacheState:
    """The cache after a Locate: its size, and what the size limit freed (shown in the dock)."""

    total_bytes: int | None = None
    freed_bytes: int = 0
    removed: int = 0

    def text(self, limit_bytes: int | None) -> str:
        if self.total_bytes is None:
            return "unknown"
        size = f"{self.total_bytes / 2**30:.1f} GB"
        size += f" of {limit_bytes / 2**30:g} GB" if limit_bytes else " (no limit)"
        if self.removed:
            size += f"; {self.removed} old index{'es' if self.removed != 1 else ''} removed " \
                    f"({self.freed_bytes / 2**30:.1f} GB)"
        return size


def tidy_cache(cache_dir: str | None, max_bytes: int | None, keep: tuple[str, ...] = ()) -> CacheState:
    """Prune the cache to the user's limit (least recently used indexes; never those just used (`keep`),
    a build in progress or a result a project may show) and measure it. A cache that cannot be tidied
    must not fail the Locate that just succeeded: the reason goes to the log."""
    from model_backend.core.errors import CdiktError
    from model_backend.core.paths import default_cache_dir
    from model_backend.core.space import folder_bytes

    try:
        removed = []
        if max_bytes is not None:
            from model_backend.index.cache import prune_cache  # imports torch: worker thread only

            removed = prune_cache(cache_dir, max_bytes, keep=keep)
        return CacheState(folder_bytes(cache_dir or default_cache_dir()), sum(e.bytes for e in removed), len(removed))
    except (OSError, CdiktError) as exc:
        log.warning("Could not tidy the cache: %s", exc)
        return CacheState()


class LocatingTask(EngineTask):
    """One engine run that locates (a photo or a flight) on a worker thread, then tidies the cache to the
    user's limit; `run_engine` is the engine call, `keep` the index folders the tidy must not remove."""

    def __init__(self, request_id: int, request: Any, description: str, on_done: Callable[[Any], None] | None,
                 cache_max_bytes: int | None) -> None:
        super().__init__(description, on_done)
        self.request_id = request_id
        self.request = request
        self.cache_max_bytes = cache_max_bytes
        self.cache = CacheState()
        self._start = time.perf_counter()

    def run_engine(self) -> tuple[Any, tuple[str, ...]]:
        raise NotImplementedError

    def work(self) -> Any:
        self._start = time.perf_counter()
        os.makedirs(self.request.out_dir, exist_ok=True)
        self._progress(0.0, "Starting…")
        result, keep = self.run_engine()
        self.cache = tidy_cache(self.request.cache_dir, self.cache_max_bytes, keep=keep)
        return result

    def done_message(self) -> str:
        return f"Done in {time.perf_counter() - self._start:.1f} s"


class LocateTask(LocatingTask):
    """Run one LocateRequest (the index is cached by the engine) on a worker thread (see EngineTask)."""

    def __init__(self, request_id: int, request: Any, on_done: Callable[[LocateTask], None] | None = None,
                 cache_max_bytes: int | None = None) -> None:
        super().__init__(request_id, request, f"CDIKT: locating {Path(request.photo).name}", on_done, cache_max_bytes)

    def run_engine(self) -> tuple[Any, tuple[str, ...]]:
        from model_backend.locate.pipeline import locate

        result = locate(self.request, progress=self._progress, cancel=self.isCanceled)
        return result, tuple(result.index_dirs)


def flight_request(params: LocateParams, source: RasterSource, out_dir: str, settings: Any) -> Any:
    """The engine's FlightRequest for a flight folder picked in the dock (`params.photo` is the folder):
    the locate options the dock shows (but the structure re-rank: the track does that work, at no cost per
    photo), and the flight's top speed, motion and log."""
    from dataclasses import replace

    from model_backend.core.requests import FlightRequest

    one = locate_request(params, source, out_dir, settings)
    query = replace(one.query, structure=False)
    return FlightRequest(one.raster, (params.photo,), out_dir, tiling=one.tiling, query=query, model=one.model,
                         cache_dir=one.cache_dir, verify=one.verify, prior_radius_m=one.prior_radius_m,
                         max_speed_m_s=params.max_speed_m_s, motion=params.motion, log=params.flight_log)


class FlightTask(LocatingTask):
    """Run one FlightRequest (every photo located, then the track decoded) on a worker thread."""

    def __init__(self, request_id: int, request: Any, on_done: Callable[[FlightTask], None] | None = None,
                 cache_max_bytes: int | None = None) -> None:
        super().__init__(request_id, request, f"CDIKT: locating the flight {Path(request.sources[0]).name}", on_done,
                         cache_max_bytes)

    def run_engine(self) -> tuple[Any, tuple[str, ...]]:
        from model_backend.locate.flight.run import locate_flight

        result = locate_flight(self.request, progress=self._progress, cancel=self.isCanceled)
        return result, tuple(result.index_dirs)

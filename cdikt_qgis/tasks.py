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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayer, QgsProviderRegistry, QgsRasterLayer, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

log = logging.getLogger(__name__)


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
        raise LayerError(
            f"'{layer.name()}' is a {provider} layer (web or database), not a file. Save it as a GeoTIFF "
            "first (right-click > Export > Save As…) and locate in that."
        )
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


_LIVE: set[LocateTask] = set()
"""Python references to tasks until they finish: a task collected while running crashes QGIS,
and unload() must be able to drop its own references while a cancelled task winds down."""


class LocateTask(QgsTask):
    """Index the raster (cached by the engine) and locate one photo in it.

    ``on_done(task)`` is called from ``finished()`` on the main thread; it reads ``result``,
    ``error`` (one of the ``ERROR_*`` kinds) and ``message``. ``progressed`` carries the
    engine's fraction and short message; connect it to a QObject's method so Qt queues it to
    the main thread.
    """

    progressed = pyqtSignal(float, str)

    OK, CANCELLED, USER, NO_TORCH, BUG = "ok", "cancelled", "user", "no_torch", "bug"

    def __init__(self, request: int, source: RasterSource, photo: str, out_dir: str, *,
                 footprint_m: float, footprint_auto: bool, top_k: int, cache_dir: str | None,
                 weights: str | None, on_done: Callable[[LocateTask], None] | None = None,
                 verify: bool | None = None, prior_radius_m: float | None = None) -> None:
        super().__init__(f"CDIKT: locating {Path(photo).name}", QgsTask.CanCancel)
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
        self.on_done = on_done
        self.result: Any = None
        self.outcome: str | None = None
        self.message = ""
        self.details = ""
        self.status_text = "Queued"
        _LIVE.add(self)

    # -- worker thread -------------------------------------------------------------------------
    def _progress(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.status_text = message
        self.setProgress(100.0 * fraction)
        self.progressed.emit(fraction, message)

    def run(self) -> bool:
        start = time.perf_counter()
        try:
            from model_backend.config import ModelConfig, QueryConfig, TilingConfig
            from model_backend.errors import Cancelled, CdiktError
        except ImportError as exc:
            return self._fail_import(exc)
        try:
            from model_backend.locate import locate_photo

            os.makedirs(self.out_dir, exist_ok=True)
            self._progress(0.0, "Starting…")
            query_fp = None if self.footprint_auto else self.footprint_m
            self.result = locate_photo(
                self.source.path, self.photo, self.out_dir,
                tiling=TilingConfig(footprint_m=self.footprint_m),
                query=QueryConfig(top_k=self.top_k, footprint_m=query_fp),
                model=ModelConfig(weights=self.weights),
                cache_dir=self.cache_dir, progress=self._progress, cancel=self.isCanceled,
                verify=self.verify, prior_radius_m=self.prior_radius_m,
            )
        except Cancelled as exc:
            self.outcome, self.message = self.CANCELLED, str(exc)
            return False
        except CdiktError as exc:
            text = str(exc).strip()
            self.outcome, self.message = self.USER, text.splitlines()[0] if text else type(exc).__name__
            return False
        except ImportError as exc:
            return self._fail_import(exc)
        except Exception as exc:  # a bug: keep everything for the log
            self.outcome, self.message = self.BUG, f"{type(exc).__name__}: {exc}"
            self.details = traceback.format_exc()
            return False
        if self.isCanceled():  # cancelled after the last check: the result is stale for the user
            self.outcome, self.message = self.CANCELLED, "Cancelled."
            return False
        self.outcome = self.OK
        self.message = f"Done in {time.perf_counter() - start:.1f} s"
        return True

    def _fail_import(self, exc: ImportError) -> bool:
        missing = getattr(exc, "name", "") or ""
        if missing.split(".")[0] in ("torch", "torchvision", "timm"):
            self.outcome = self.NO_TORCH
            self.message = (
                f"PyTorch is not available to QGIS's Python ({exc}). Install it with `make setup`, or "
                "`pip install torch` into the Python env whose site-packages is set in the "
                "cdikt/python_site_packages setting (or CDIKT_SITE_PACKAGES), then restart QGIS."
            )
        else:
            self.outcome = self.BUG
            self.message = f"The CDIKT engine could not be imported: {exc}"
        self.details = traceback.format_exc()
        return False

    # -- main thread ---------------------------------------------------------------------------
    def finished(self, ok: bool) -> None:  # noqa: D401 (QGIS API)
        try:
            if not ok and self.outcome is None:
                # cancelled before run() started, or terminated by the task manager
                self.outcome, self.message = self.CANCELLED, "Cancelled."
            if self.on_done is not None:
                self.on_done(self)
        except Exception:
            log.exception("Error while handling the end of %s", self.description())
        finally:
            self.on_done = None
            _LIVE.discard(self)

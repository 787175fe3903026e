"""One request object per job, and one typed outcome for all of them.

The dock, the Processing algorithms and the command line each build the same request for the
same job and hand it unchanged to the engine (`locate.pipeline.locate`, `index.build.index_raster`,
`learn.adapt.adapt_model`), so
an option exists everywhere or nowhere and a front end cannot quietly drop one. What comes back
to a front end that must not raise (a QGIS task) is an `Outcome`: succeeded with a value,
cancelled, or failed with one line for the user, and for a bug the traceback for the log.
Torch-free: the plugin builds requests on QGIS's main thread.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from model_backend.core.config import ADAPT_LOOKS, ModelConfig, QueryConfig, TilingConfig
from model_backend.core.errors import Cancelled, CdiktError, InputError, MissingDependency

T = TypeVar("T")


@dataclass(frozen=True)
class LocateRequest:
    """Locate one photo on one raster; outputs go to `out_dir` (<stem>.heatmap.tif, .matches.*)."""

    raster: str
    photo: str
    out_dir: str
    tiling: TilingConfig = TilingConfig()
    query: QueryConfig = QueryConfig()
    model: ModelConfig = ModelConfig()
    cache_dir: str | None = None
    verify: bool | None = None
    """None: verify when the photo looks down enough (the engine decides); False: never; True: always."""
    prior_radius_m: float | None = None
    """Score only tiles this close to the photo's EXIF position; None: the whole raster."""
    out_name: str | None = None
    """Name of the outputs (<out_name>.heatmap.tif, ...); None: the photo's stem. A batch gives each
    photo a distinct one (core.paths.output_names)."""


@dataclass(frozen=True)
class FlightRequest:
    """Locate a flight: every photo as `LocateRequest` does, then the sequence decoded as one track.

    Outputs go to `out_dir`: each photo's locate files, `flight.gpkg` (layers track and photos) and
    `flight.csv`. A photo already located there with the same raster, model and settings is reused,
    so a cancelled or failed run resumes where it stopped.
    """

    raster: str
    sources: tuple[str, ...]
    """The flight's folder(s) and/or photo files."""
    out_dir: str
    tiling: TilingConfig = TilingConfig()
    query: QueryConfig = QueryConfig(structure=False)
    """Without the structure re-rank by default: about 1.5 s a photo, where the track does that work for free."""
    model: ModelConfig = ModelConfig()
    cache_dir: str | None = None
    verify: bool | None = None
    prior_radius_m: float | None = None
    states: int = 100
    """Best tiles per photo (besides its candidates) the track may choose among."""
    max_speed_m_s: float = 20.0
    """Fastest ground speed between photos the track allows."""
    interval_s: float = 3.0
    """Time between photos assumed when they carry no timestamps (ordered by name)."""
    use_gps: bool = True
    """Photos' GPS positions (EXIF or the log) as a prior in the decoding."""
    motion: bool = True
    """Match each photo with the one before to measure the move between them (about 0.2 s a photo)."""
    log: str | None = None
    """A flight log CSV (UAV-VisLoc columns: filename, date, lat, lon, height, Phi1) overriding EXIF."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise InputError("A flight needs its photos: give a folder or photo files.")
        if not 1 <= self.states <= 1000:
            raise InputError(f"Places per photo for the track (states) must be 1-1000, got {self.states}.")
        if not (self.max_speed_m_s > 0 and self.interval_s > 0):
            raise InputError("The flight's top speed and photo interval must be positive.")


@dataclass(frozen=True)
class IndexRequest:
    """Embed every tile of a raster once (reused from the cache when it exists)."""

    raster: str
    tiling: TilingConfig = TilingConfig()
    model: ModelConfig = ModelConfig()
    cache_dir: str | None = None
    ann: str = "auto"
    """Compressed index: 'auto' (very large rasters), 'on' or 'off' (index.ann.ensure_ann)."""


@dataclass(frozen=True)
class AdaptRequest:
    """Fine-tune a model on the analyst's labelled pairs of one raster; the new model goes to `out`.

    Only what an analyst decides is here; the training recipe (learn.adapt.AdaptConfig) stays
    the engine's, so every front end adapts the same way.
    """

    raster: str
    labels: str
    """Labels file: GeoPackage (any CRS) or GeoJSON (WGS84), one footprint polygon per photo."""
    out: str
    """The new .safetensors file; adaptation never overwrites one."""
    model: ModelConfig = ModelConfig()
    """`weights`: the model to start from (None: the embedded default); `runtime`, `threads`: how it runs."""
    cache_dir: str | None = None
    photos: tuple[str, ...] = ()
    """Unlabelled photos of the same area: those the current model places with confidence train as extra
    pairs (learn.adapt.pseudo), the others without labels (CDTS)."""
    flight_photos: bool = False
    """Also use, as `photos`, the other photos in the folders of the labelled photos (the rest of the flight)."""
    epochs: int | None = None
    """None: the engine's default."""
    look: str = "auto"
    """'auto', 'colour' or 'luminance' (core.config.ADAPT_LOOKS)."""
    seed: int = 0
    data_dir: str | None = None
    """Where the new version is recorded (its model registry); None: the engine's data folder."""
    record: bool = True
    """False: the new model is written but not recorded as a version."""

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"Epochs must be at least 1, got {self.epochs}.")
        if self.look not in ADAPT_LOOKS:
            raise InputError(f"Unknown look {self.look!r}; use one of {', '.join(ADAPT_LOOKS)}.")
        object.__setattr__(self, "photos", tuple(str(p) for p in self.photos))


class Status(Enum):
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Failure(Enum):
    """Why a job failed, which decides how a front end shows it."""

    INPUT = "input"
    """The user's input or environment: the message says what to do."""
    MISSING_DEPENDENCY = "missing dependency"
    """A package is not installed (PyTorch in QGIS's Python): the message says how to install it."""
    BUG = "bug"
    """Anything else: the details hold the traceback for the log."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a job came to; `value` only when it succeeded."""

    status: Status
    value: T | None = None
    message: str = ""
    """One line for the user (empty when it succeeded)."""
    failure: Failure | None = None
    details: str = ""
    """A traceback, for the log."""

    @property
    def succeeded(self) -> bool:
        return self.status is Status.SUCCEEDED

    @classmethod
    def of(cls, job: Callable[[], T], cancelled_message: str = "Cancelled.") -> Outcome[T]:
        """Run `job` and say how it ended; never raises (a QGIS task must not)."""
        try:
            return cls(Status.SUCCEEDED, job())
        except Cancelled as exc:
            return cls.cancelled(str(exc) or cancelled_message)
        except MissingDependency as exc:
            return cls.failed(Failure.MISSING_DEPENDENCY, _one_line(exc), traceback.format_exc())
        except CdiktError as exc:
            return cls.failed(Failure.INPUT, _one_line(exc))
        except Exception as exc:  # a bug: keep everything for the log
            return cls.failed(Failure.BUG, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    @classmethod
    def cancelled(cls, message: str = "Cancelled.") -> Outcome[Any]:
        return cls(Status.CANCELLED, message=message)

    @classmethod
    def failed(cls, failure: Failure, message: str, details: str = "") -> Outcome[Any]:
        return cls(Status.FAILED, message=message, failure=failure, details=details)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""One config object per concern, serialised into every index manifest and result.

Keeping tiling, model and query settings apart lets an index be reused by any query whose
tiling and model match, and lets any output be traced back to exactly what produced it.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from model_backend.core.errors import InputError


@dataclass(frozen=True)
class TilingConfig:
    """How the raster is cut into tiles, in ground units so it means the same in any CRS."""

    footprint_m: float = 60.0
    """Side of one square tile on the ground, in metres."""
    stride: float = 0.5
    """Step between tiles as a fraction of the footprint (0.5 = 50 % overlap)."""
    min_valid_fraction: float = 0.5
    """Tiles with less valid (not nodata / alpha / masked) area than this are skipped."""
    max_tiles: int = 2_000_000
    """Refuse jobs with more tiles than this before doing any work."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and where."""

    weights: str | None = None
    """Path to a weights file; None means the embedded default."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'."""
    batch_size: int = 32
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    runtime: str = "auto"
    """CPU inference engine: 'auto' (OpenVINO, else ONNX Runtime, else PyTorch), 'torch', 'openvino' or
    'onnxruntime'. CUDA always runs PyTorch. Embeddings agree across runtimes, so the index key ignores it."""

    def __post_init__(self) -> None:
        _in_range("Batch size", self.batch_size, 1, MAX_BATCH)
        if self.threads is not None:
            _in_range("Threads", self.threads, 1, 1024)
        if not re.fullmatch(DEVICE_PATTERN, str(self.device)):
            raise InputError(f"Unknown device {self.device!r}; use auto, cpu, cuda or cuda:N.")
        if self.runtime not in RUNTIME_NAMES:
            raise InputError(f"Unknown runtime {self.runtime!r}; use one of {', '.join(RUNTIME_NAMES)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueryConfig:
    """How a photo is turned into scores and candidates."""

    top_k: int = 5
    rotations: int = 8
    """Headings tried for a photo of unknown heading (evenly spaced over 360°)."""
    nms_iou: float = 0.1
    """Candidates overlapping a better one by more than this IoU are suppressed."""
    footprint_m: float | None = None
    """Ground size of the photo's short side; None = from EXIF, else a scale search."""
    scale_search: tuple[float, ...] = field(default=(0.6, 1.0, 1.6))
    """Footprint multipliers tried when the footprint is unknown."""
    footprint_tolerance: float = 0.3
    structure: bool = True
    """Re-rank the best candidates by the shape of the ground (field edges, roads, shores; see
    model_backend.locate.structure): what still matches when the photo and the map are years apart."""
    """How far a given footprint (typed, or from EXIF) may be off: the sizes given/(1+t), given and
    given*(1+t) are searched and the best-scoring one is used (0: the given size only). An analyst's
    guess of the ground size is rarely within 10 %; at 0.3 a guess 30 % off locates as well as the
    true size (bench part `footprint`), for about 3x the indexing of one size, once per raster."""

    def __post_init__(self) -> None:
        _in_range("Number of candidates", self.top_k, 1, MAX_TOP_K)
        _in_range("Number of headings (rotations)", self.rotations, 1, MAX_ROTATIONS)
        if not 0.0 <= self.nms_iou <= 1.0:
            raise InputError(f"NMS IoU must be between 0 and 1 (e.g. 0.1), got {self.nms_iou}.")
        if self.footprint_m is not None and not (math.isfinite(self.footprint_m) and self.footprint_m > 0):
            raise InputError(f"The footprint must be a positive number of metres, got {self.footprint_m}.")
        if not (isinstance(self.footprint_tolerance, numbers.Real) and 0.0 <= self.footprint_tolerance <= 1.0):
            raise InputError(f"The footprint tolerance must be between 0 and 1 (e.g. 0.3 for ±30 %), "
                             f"got {self.footprint_tolerance}.")
        if not self.scale_search or not all(math.isfinite(s) and s > 0 for s in self.scale_search):
            raise InputError(f"Scale search factors must be positive numbers, got {self.scale_search}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_TOP_K = 1000
MAX_ROTATIONS = 360
MAX_BATCH = 4096
"""Upper bounds of the options: beyond them a job asks for absurd memory or time (a batch of 10^8
tiles tried to allocate terabytes), so it is refused in one line before any work."""
RUNTIME_NAMES = ("auto", "torch", "openvino", "onnxruntime")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""What `ModelConfig.device` accepts (a whole-string regular expression)."""


def _in_range(what: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise InputError(f"{what} must be a whole number from {lo} to {hi}, got {value!r}.")


ADAPT_LOOKS = ("auto", "colour", "luminance")
"""What an adapted model may do with colour (learn.adapt.look); here, torch-free, for the CLI's options."""

"""One config object per concern, serialised into every index manifest and result.

Keeping tiling, model and query settings apart lets an index be reused by any query whose
tiling and model match, and lets any output be traced back to exactly what produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ADAPT_LOOKS = ("auto", "colour", "luminance")
"""What an adapted model may do with colour (learn.adapt.look); here, torch-free, for the CLI's options."""

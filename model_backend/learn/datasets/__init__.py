"""Training and evaluation data: benchmark readers, simulated raster pairs, few-shot splits.

Every source ends as `ImageRecord`s (path, location id, view), so the trainer and the evaluator
do not care whether images came from University-1652, SUES-200 or a raster. Nothing here
downloads anything: the benchmarks must already be on disk, in their published layouts.
"""

from __future__ import annotations

from pathlib import Path

from model_backend.core.errors import InputError
from model_backend.learn.datasets.common import (
    FewShotSplit,
    ImageRecord,
    label_map,
    locations_of,
    scan_view_folder,
    split_paired,
)
from model_backend.learn.datasets.raster_pairs import (
    PairLocation,
    RasterPairDataset,
    SimulatedPair,
    random_crops,
    render_pair,
    sample_locations,
    satellite_crop,
)
from model_backend.learn.datasets.sampling import ImageDataset, LocationBatchSampler, PairedDataset
from model_backend.learn.datasets.sues200 import HEIGHTS, read_sues200, write_sues200_layout
from model_backend.learn.datasets.transforms import AugmentConfig, PairTransform, load_rgb, to_model_input
from model_backend.learn.datasets.university1652 import read_university1652, write_university_layout

LAYOUTS = ("university1652", "sues200")

__all__ = [
    "HEIGHTS", "LAYOUTS", "AugmentConfig", "FewShotSplit", "ImageDataset", "ImageRecord", "LocationBatchSampler",
    "PairLocation", "PairTransform", "PairedDataset", "RasterPairDataset", "SimulatedPair", "label_map", "load_rgb",
    "locations_of", "random_crops", "read_layout", "read_sues200", "read_university1652", "render_pair",
    "sample_locations", "satellite_crop", "scan_view_folder", "split_paired", "to_model_input",
    "write_sues200_layout", "write_university_layout",
]


def read_layout(layout: str, root: str | Path, split: str = "test", height: int | None = None
                ) -> dict[str, list[ImageRecord]]:
    """One entry point for both benchmarks: train -> {drone, satellite}; test -> the four query/gallery sets."""
    if layout == "university1652":
        if height is not None:
            raise InputError("--height applies to SUES-200 only; drop it for University-1652.")
        return read_university1652(root, split)
    if layout == "sues200":
        return read_sues200(root, split, height)
    raise InputError(f"Unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")

"""SUES-200: reader for the benchmark's split layout (per flight height), and a writer of it.

Layout produced by the benchmark's `script/split_datasets.py` (Zhu et al., SUES-200-Benchmark),
which MEAN and Sample4Geo-style code read as `<root>/Training/<h>/...`:
    Training/<h>/drone/<id>/*.jpg         drone views at height h (150, 200, 250, 300 m)
    Training/<h>/satellite/<id>/0.png     the location's satellite tile
    Testing/<h>/query_drone/<id>/...      test locations only
    Testing/<h>/query_satellite/<id>/...
    Testing/<h>/gallery_drone/<id>/...    every location (train and test): the others are distractors
    Testing/<h>/gallery_satellite/<id>/...
The raw release (`satellite-view/`, drone views per location and height) is not split yet; it is
refused with the command that splits it, rather than split here in a way that might differ from
the published protocol (120 training and 80 test locations).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_backend.core.errors import InputError
from model_backend.learn.datasets.common import ImageRecord, check_paired, check_queries_match, scan_view_folder
from model_backend.learn.datasets.raster_pairs import render_drone, sample_locations, satellite_crop
from model_backend.learn.datasets.university1652 import TEST_SETS, TRAIN_SETS, save_image, split_locations

HEIGHTS = (150, 200, 250, 300)
SPLITS = {"train": "Training", "test": "Testing"}
EXPECTED = "Training/<height>/{drone,satellite}/<id>/ and Testing/<height>/{query_drone,gallery_satellite,...}/<id>/"


def find_root(root: str | Path) -> Path:
    """The folder holding Training/ and Testing/ (or its parent with Dataset/ in it, where the README moves them)."""
    p = Path(root)
    if not p.is_dir():
        raise InputError(f"SUES-200 folder not found: {p}. Check --data.")
    for cand in (p, p / "Dataset"):
        if (cand / "Training").is_dir() or (cand / "Testing").is_dir():
            return cand
    if (p / "satellite-view").is_dir():
        raise InputError(f"{p} is the raw SUES-200 release; split it first with the benchmark's "
                         "script/split_datasets.py (120 training, 80 test locations) so it has Training/ and Testing/.")
    if any((p / h).is_dir() for h in map(str, HEIGHTS)):
        raise InputError(f"{p} holds height folders directly: point --data at the folder with Training/ and Testing/.")
    if (p / "train").is_dir() or (p / "test").is_dir():
        raise InputError(f"{p} has the University-1652 layout (train/, test/); use --layout university1652.")
    raise InputError(f"{p} is not a SUES-200 folder: expected {EXPECTED}.")


def read_sues200(root: str | Path, split: str = "test", height: int | None = None) -> dict[str, list[ImageRecord]]:
    """Records of one split at one height; `group` is the height, so few-shot splits stratify by it."""
    if height is None:
        raise InputError(f"SUES-200 needs a flight height: --height {'|'.join(map(str, HEIGHTS))}.")
    if int(height) not in HEIGHTS:
        raise InputError(f"SUES-200 height {height} does not exist; use one of {', '.join(map(str, HEIGHTS))}.")
    if split not in SPLITS:
        raise InputError(f"Unknown split {split!r}; use 'train' or 'test'.")
    base = find_root(root) / SPLITS[split]
    folder = base / str(int(height))
    if not folder.is_dir():
        present = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        have = f"heights present: {', '.join(present)}" if present else f"{base} not found"
        raise InputError(f"{folder} not found ({have}); check --height and --data.")
    sets = TRAIN_SETS if split == "train" else TEST_SETS
    out = {name: scan_view_folder(folder / name, view, group=str(height), expected=EXPECTED)
           for name, view in sets.items()}
    if split == "train":
        check_paired(out["drone"], out["satellite"], str(folder))
    else:
        check_queries_match(out["query_drone"], out["gallery_satellite"], f"{folder} (drone to satellite)")
        check_queries_match(out["query_satellite"], out["gallery_drone"], f"{folder} (satellite to drone)")
    return out


def write_sues200_layout(rasters: Sequence[str | Path], out: str | Path, n_locations: int, views_per_location: int,
                         seed: int, *, heights: Sequence[int] = HEIGHTS, footprint_m: float = 40.0, size: int = 256,
                         test_fraction: float = 0.4, **spec_kw) -> Path:
    """Write a small SUES-200-layout dataset simulated from real rasters; returns `out`.

    One satellite tile (`footprint_m`) per location, shared by every height, as in SUES-200.
    A drone view at height h sees `footprint_m x h / 300` of ground (at 300 m it sees about the
    tile; lower flights see less, larger), the benchmark's main difficulty. Test galleries hold
    every location, as the benchmark's split does. `cdikt_layout.json` records the locations.
    """
    if n_locations < 2 or views_per_location < 1:
        raise InputError("Writing a layout needs at least 2 locations (train and test) and 1 view per location.")
    bad = [h for h in heights if int(h) not in HEIGHTS]
    if bad:
        raise InputError(f"SUES-200 heights are {', '.join(map(str, HEIGHTS))}; got {bad[0]}.")
    locs = sample_locations(rasters, n_locations, footprint_m, seed)
    n_test = min(n_locations - 1, max(1, round(test_fraction * n_locations)))
    train, test, _ = split_locations(locs, n_test, 0, seed)
    is_test = {loc.location for loc in test}
    root = Path(out)
    rng = np.random.default_rng([seed, 200])
    for loc in sorted(locs, key=lambda loc: loc.label):
        sat, _ = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, size)
        for h in heights:
            sat_dirs = [("Testing", "gallery_satellite")] + ([("Testing", "query_satellite")] if loc.location in is_test
                                                             else [("Training", "satellite")])
            for top, name in sat_dirs:
                save_image(sat, root / top / str(h) / name / loc.location / "0.png")
            for k in range(views_per_location):
                view = render_drone(loc, rng, (size, size), footprint_m=footprint_m * int(h) / 300.0, **spec_kw)
                drone_dirs = [("Testing", "gallery_drone")] + ([("Testing", "query_drone")] if loc.location in is_test
                                                               else [("Training", "drone")])
                for top, name in drone_dirs:
                    save_image(view.image, root / top / str(h) / name / loc.location / f"{k}.jpg")
    manifest = {"layout": "sues200", "seed": seed, "footprint_m": footprint_m, "size": size,
                "heights": [int(h) for h in heights], "views_per_location": views_per_location,
                "locations": [{"id": loc.location, "part": "test" if loc.location in is_test else "train",
                               "raster": Path(loc.raster).name, "cx": loc.cx, "cy": loc.cy} for loc in locs]}
    (root / "cdikt_layout.json").write_text(json.dumps(manifest, indent=1))
    return root

"""University-1652: reader for the benchmark's folder layout, and a writer of the same layout.

Layout (Zheng et al., 2020; the `University-Release` archive):
    train/drone/<id>/*.jpeg          54 views circling each of 701 buildings
    train/satellite/<id>/<id>.jpg    one north-up tile per building
    test/query_drone/<id>/...        query and gallery_drone hold the same drone images
    test/gallery_satellite/<id>/...  the 701 test buildings plus 250 distractor tiles
    test/query_satellite/<id>/...
    test/gallery_drone/<id>/...
Other folders of the release (street, google) are ignored. The writer produces this layout from
simulated raster pairs so tests, and users without the benchmark, can run the same commands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model_backend.core.errors import InputError
from model_backend.learn.datasets.common import ImageRecord, check_paired, check_queries_match, scan_view_folder
from model_backend.learn.datasets.raster_pairs import PairLocation, render_drone, sample_locations, satellite_crop

TRAIN_SETS = {"drone": "drone", "satellite": "satellite"}
TEST_SETS = {"query_drone": "drone", "gallery_satellite": "satellite",
             "query_satellite": "satellite", "gallery_drone": "drone"}
EXPECTED = "train/{drone,satellite}/<id>/ and test/{query_drone,gallery_satellite,query_satellite,gallery_drone}/<id>/"


def find_root(root: str | Path) -> Path:
    """The folder holding train/ and test/; accepts the archive's parent (with University-Release/ in it)."""
    p = Path(root)
    if not p.is_dir():
        raise InputError(f"University-1652 folder not found: {p}. Check --data.")
    if (p / "University-Release").is_dir() and not ((p / "train").is_dir() or (p / "test").is_dir()):
        p = p / "University-Release"
    if (p / "train").is_dir() or (p / "test").is_dir():
        return p
    inner = [n for n in (*TRAIN_SETS, *TEST_SETS) if (p / n).is_dir()]
    if inner:
        raise InputError(f"{p} holds {inner[0]}/ directly: it is a split folder; point --data at its parent, "
                         "the folder with train/ and test/.")
    if (p / "Training").is_dir() or (p / "Testing").is_dir():
        raise InputError(f"{p} has the SUES-200 layout (Training/, Testing/); use --layout sues200.")
    raise InputError(f"{p} is not a University-1652 folder: expected {EXPECTED}.")


def read_university1652(root: str | Path, split: str = "test") -> dict[str, list[ImageRecord]]:
    """Records of one split: {"drone", "satellite"} for train, the four query/gallery sets for test."""
    sets = {"train": TRAIN_SETS, "test": TEST_SETS}.get(split)
    if sets is None:
        raise InputError(f"Unknown split {split!r}; use 'train' or 'test'.")
    base = find_root(root) / split
    out = {name: scan_view_folder(base / name, view, expected=EXPECTED) for name, view in sets.items()}
    if split == "train":
        check_paired(out["drone"], out["satellite"], str(base))
    else:
        check_queries_match(out["query_drone"], out["gallery_satellite"], f"{base} (drone to satellite)")
        check_queries_match(out["query_satellite"], out["gallery_drone"], f"{base} (satellite to drone)")
    return out


def save_image(img: np.ndarray, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=quality)


def split_locations(locations: Sequence[PairLocation], n_test: int, n_distractors: int,
                    seed: int) -> tuple[list[PairLocation], list[PairLocation], list[PairLocation]]:
    """Seeded (train, test, distractor) split of locations; ids keep their order inside each part."""
    order = np.random.default_rng([seed, 1652]).permutation(len(locations))
    parts = [sorted((locations[i] for i in idx), key=lambda loc: loc.label)
             for idx in (order[n_test + n_distractors:], order[:n_test], order[n_test:n_test + n_distractors])]
    return parts[0], parts[1], parts[2]


def write_university_layout(rasters: Sequence[str | Path], out: str | Path, n_locations: int, views_per_location: int,
                            seed: int, *, footprint_m: float = 40.0, size: int = 256, test_fraction: float = 0.5,
                            n_distractors: int = 0, **spec_kw) -> Path:
    """Write a small University-1652-layout dataset simulated from real rasters; returns `out`.

    `n_locations` are split into train and test (`test_fraction`, at least one each); the test
    gallery also holds `n_distractors` extra satellite tiles of locations no query shows, as the
    benchmark's does. Drone views are `size`-pixel squares (`render_view` with random camera), the
    satellite tiles north-up crops. `cdikt_layout.json` beside train/ and test/ records every
    location's raster, centre and footprint, so any image can be traced back to the ground.
    """
    if n_locations < 2 or views_per_location < 1:
        raise InputError("Writing a layout needs at least 2 locations (train and test) and 1 view per location.")
    locs = sample_locations(rasters, n_locations + n_distractors, footprint_m, seed)
    n_test = min(n_locations - 1, max(1, round(test_fraction * n_locations)))
    train, test, extra = split_locations(locs, n_test, n_distractors, seed)
    root = Path(out)
    rng = np.random.default_rng([seed, 2])
    for part, locations in (("train", train), ("test", test)):
        for loc in locations:
            sat, _ = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, size)
            sat_sets = ("satellite",) if part == "train" else ("query_satellite", "gallery_satellite")
            for name in sat_sets:
                save_image(sat, root / part / name / loc.location / f"{loc.location}.jpg")
            for k in range(views_per_location):
                view = render_drone(loc, rng, (size, size), **spec_kw)
                drone_sets = ("drone",) if part == "train" else ("query_drone", "gallery_drone")
                for name in drone_sets:
                    save_image(view.image, root / part / name / loc.location / f"image-{k + 1:02d}.jpeg")
    for loc in extra:
        sat, _ = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, size)
        save_image(sat, root / "test" / "gallery_satellite" / loc.location / f"{loc.location}.jpg")
    manifest = {"layout": "university1652", "seed": seed, "footprint_m": footprint_m, "size": size,
                "views_per_location": views_per_location,
                "locations": [{"id": loc.location, "part": part, "raster": Path(loc.raster).name, "cx": loc.cx,
                               "cy": loc.cy} for part, ls in (("train", train), ("test", test), ("distractor", extra))
                              for loc in ls]}
    (root / "cdikt_layout.json").write_text(json.dumps(manifest, indent=1))
    return root

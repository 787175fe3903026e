"""What every dataset reader returns, the folder scan they share, and the few-shot split.

Benchmarks, simulated raster pairs and a user's own labelled photos all reduce to the same thing:
image files tagged with a location id and a view (drone or satellite). Keeping that one record type
lets training, evaluation and the few-shot split ignore where the images came from.
A layout that is wrong must fail before any model is loaded, with one line that says what to fix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_backend.core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
"""University-1652 drone images are `.jpeg`, its satellite images `.jpg`; SUES-200 mixes `.jpg`/`.png`."""
VIEWS = ("drone", "satellite")
UNITS = ("location", "pair")


@dataclass(frozen=True)
class ImageRecord:
    """One image file of one location seen from one view."""

    path: str
    location: str
    """Location id: the class folder's name in the benchmark layouts (e.g. "0839")."""
    view: str
    """"drone" or "satellite"."""
    group: str = ""
    """Stratum for the few-shot split: SUES-200 height, source raster, ... ("" when there is one)."""


@dataclass(frozen=True)
class FewShotSplit:
    """The paired subset CDIS trains on, and the rest, which CDTS sees without labels."""

    paired: list[tuple[ImageRecord, ImageRecord]]
    """(drone, satellite) pairs of the same location."""
    unpaired_drone: list[ImageRecord]
    unpaired_satellite: list[ImageRecord]
    """Their `location` fields are kept for evaluation only: training must not read them."""


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def scan_view_folder(folder: Path, view: str, *, group: str = "", expected: str = "") -> list[ImageRecord]:
    """Records of `folder/<location>/<image>`, sorted by location then file name.

    Every problem is reported with the folder it was found in and what the layout should be
    (`expected`), because a mis-pointed `--data` is the usual cause and the fix is a path.
    """
    hint = f" Expected {expected}." if expected else ""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise InputError(f"Folder {folder} {what}.{hint} Check --data.")
    entries = sorted(folder.iterdir())
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    if not subdirs:
        loose = sum(1 for p in entries if is_image(p))
        detail = (f"holds {loose} images but no location folders" if loose else "holds no location folders")
        raise InputError(f"{folder} {detail}: images must sit in one subfolder per location "
                         f"({folder.name}/<id>/).{hint}")
    records: list[ImageRecord] = []
    empty: list[str] = []
    for d in subdirs:
        images = sorted(p for p in d.iterdir() if is_image(p))
        if not images:
            empty.append(d.name)
        records.extend(ImageRecord(str(p), d.name, view, group) for p in images)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise InputError(f"Location folder {folder / empty[0]}{more} holds no images ({'/'.join(IMAGE_SUFFIXES[:3])}"
                         "...); add its images or remove the empty folder.")
    return records


def locations_of(records: Iterable[ImageRecord]) -> list[str]:
    return sorted({r.location for r in records})


def check_paired(drone: Sequence[ImageRecord], satellite: Sequence[ImageRecord], where: str) -> None:
    """Training pairs need both views of every location: a drone location without its satellite
    image usually means two folders from different splits or datasets were combined."""
    d, s = set(locations_of(drone)), set(locations_of(satellite))
    missing = sorted(d - s)
    if missing:
        raise InputError(f"{len(missing)} drone locations in {where} have no satellite image (e.g. {missing[0]}); "
                         "every location needs both views under the same folder name.")


def check_queries_match(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], where: str) -> None:
    """A query set sharing no location with its gallery can only score zero: a wrong folder, not a result."""
    if not set(locations_of(query)) & set(locations_of(gallery)):
        raise InputError(f"No query location of {where} appears in its gallery; the query and gallery folders "
                         "must use the same location folder names.")


def label_map(records: Iterable[ImageRecord]) -> dict[str, int]:
    """Dense class labels 0..L-1 in sorted id order, so a label is the same for every run and view."""
    return {loc: i for i, loc in enumerate(locations_of(records))}


def _allocate(sizes: dict[str, int], total: int, rng: np.random.Generator) -> dict[str, int]:
    """Split `total` over strata in proportion to their sizes (largest remainder), each <= its size.

    Equal remainders are common (every University-1652 location has 54 drone images); ties are
    broken at random rather than by id, so leftover pairs do not always go to the lowest ids.
    """
    keys = sorted(sizes)
    tiebreak = dict(zip(keys, rng.permutation(len(keys)).tolist()))
    n = sum(sizes.values())
    exact = {g: total * sizes[g] / n for g in keys}
    out = {g: min(int(exact[g]), sizes[g]) for g in keys}
    for g in sorted(keys, key=lambda g: (-(exact[g] - int(exact[g])), tiebreak[g])):
        if sum(out.values()) >= total:
            break
        if out[g] < sizes[g]:
            out[g] += 1
    return out


def split_paired(records: Sequence[ImageRecord], fraction: float, seed: int, unit: str = "location") -> FewShotSplit:
    """Seeded few-shot split: which images keep their drone-satellite pairing.

    The paper uses "2 % paired data" without saying 2 % of what, so both readings are supported:
    - unit="location": that fraction of locations keep all their pairs (every drone image of the
      location with its satellite image); stratified over `group` so each height or raster gets
      its share. At least one location is paired.
    - unit="pair": that fraction of all drone images, each paired with its location's satellite
      image, stratified over locations (largest remainder), so pairs spread over as many locations
      as the budget allows instead of clustering.
    Unpaired drone images are the drone images not in a pair; unpaired satellite images are those of
    locations with no pair. The result depends only on the records' content and the seed, not on
    their order.
    """
    if unit not in UNITS:
        raise InputError(f"Unknown pairing unit {unit!r}; use 'location' or 'pair'.")
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"The paired fraction must be in (0, 1], got {fraction}.")
    drone = sorted((r for r in records if r.view == "drone"), key=lambda r: (r.location, r.path))
    sats: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in sorted((r for r in records if r.view == "satellite"), key=lambda r: (r.location, r.path)):
        sats[r.location].append(r)
    check_paired(drone, [s for v in sats.values() for s in v], "the training set")
    if not drone:
        raise InputError("The training set has no drone images; nothing can be paired.")
    rng = np.random.default_rng(seed)
    by_loc: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in drone:
        by_loc[r.location].append(r)
    chosen: list[ImageRecord] = []
    if unit == "location":
        strata: dict[str, list[str]] = defaultdict(list)
        for loc, rs in by_loc.items():
            strata[rs[0].group].append(loc)
        total = max(1, round(fraction * len(by_loc)))
        quota = _allocate({g: len(v) for g, v in strata.items()}, total, rng)
        for g in sorted(strata):
            picked = rng.permutation(len(strata[g]))[:quota[g]]
            for i in sorted(picked):
                chosen.extend(by_loc[strata[g][i]])
    else:
        total = max(1, round(fraction * len(drone)))
        quota = _allocate({loc: len(v) for loc, v in by_loc.items()}, total, rng)
        for loc in sorted(by_loc):
            picked = rng.permutation(len(by_loc[loc]))[:quota[loc]]
            chosen.extend(by_loc[loc][i] for i in sorted(picked))
    chosen_set = set(chosen)
    paired = [(d, sats[d.location][i % len(sats[d.location])]) for i, d in enumerate(chosen)]
    paired_locs = {d.location for d in chosen}
    return FewShotSplit(
        paired=paired,
        unpaired_drone=[r for r in drone if r not in chosen_set],
        unpaired_satellite=[s for loc in sorted(sats) if loc not in paired_locs for s in sats[loc]],
    )

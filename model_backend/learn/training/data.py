"""Training data for every layout, reduced to two shapes the loop understands.

- `PairSource`: (drone, satellite, location label) items for CDIS, with the label of every item so
  `LocationBatchSampler` can keep one pair per location in a batch;
- `ImageSet`: single images with a known location label or -1, for CDTS (which must not see the
  labels of unpaired images: -1 is all it gets).
Augmentation draws from a generator seeded by (seed, epoch, item), never from a global RNG, so
a resumed run, or one with more DataLoader workers, sees exactly the same images.

Rasters: `--data` is a raster, a folder of rasters, or a text file with one raster per line and
an optional footprint in metres after it ("naip_2015.tif 600"; '#' starts a comment; relative
paths are relative to the list file), and optionally `region=x0,y0,x1,y1` (fractions of the raster
from its top-left: only that part is trained on, so the rest can measure the model honestly).
Locations are a grid over each raster; co-registered rasters (the same area in several years)
share a location's label, and a pair may take its satellite tile from another year than its drone
view, so the model learns that seasons do not move places.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets import PairedDataset, PairTransform, load_rgb, read_layout, to_model_input
from model_backend.learn.datasets.common import ImageRecord
from model_backend.learn.datasets.raster_pairs import PairLocation, render_drone, sample_locations, satellite_crop
from model_backend.learn.datasets.region import WHOLE, Region
from model_backend.learn.datasets.transforms import to_tensor

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
Item = str | np.ndarray
"""An image file path, or an image already in memory as (H, W, 3) uint8."""


def _rng(seed: int, epoch: int, i: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, i, salt])


def _load(item: Item):
    return load_rgb(item) if isinstance(item, str) else item


@dataclass
class PairSource:
    """CDIS training pairs: `dataset[i]` = (drone tensor, satellite tensor, label)."""

    dataset: Dataset
    labels: list[int]
    n_classes: int
    description: str = ""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


@dataclass
class ImageSet:
    """CDTS images of both views; `*_known[i]` = the location label where a pair is known, else -1."""

    drone: list[Item]
    satellite: list[Item]
    drone_known: np.ndarray
    sat_known: np.ndarray
    description: str = ""
    extra: dict = field(default_factory=dict)


class RecordPairs(Dataset):
    """Benchmark pairs from image files (pairing as `PairedDataset`), augmented from a per-item seed."""

    def __init__(self, pairs: Sequence[tuple[ImageRecord, ImageRecord]], labels: Sequence[int],
                 transform: PairTransform | None, seed: int) -> None:
        self.pairs, self.labels, self.transform, self.seed, self.epoch = list(pairs), list(labels), transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        d, s = self.pairs[i]
        if self.transform is None:
            return np.asarray(load_rgb(d.path)), np.asarray(load_rgb(s.path)), self.labels[i]
        dt, st = self.transform(load_rgb(d.path), load_rgb(s.path), _rng(self.seed, self.epoch, i))
        return dt, st, self.labels[i]


class RasterPairs(Dataset):
    """`views` simulated drone views per location label and epoch, each with a tile of that place.

    Co-registered rasters (one place, several years) share a label: its views take turns among
    them, and each tile comes from a seeded choice among them, so a pair may span two years. A
    place counts once however many years show it. Fresh drone cameras every epoch.
    """

    def __init__(self, locations: Sequence[PairLocation], views: int, size: int, transform: PairTransform | None,
                 seed: int) -> None:
        self.locations, self.views, self.size, self.transform = list(locations), views, size, transform
        self.seed, self.epoch = seed, 0
        groups: dict[int, list[PairLocation]] = defaultdict(list)
        for loc in self.locations:
            groups[loc.label].append(loc)
        self.groups = [groups[lab] for lab in sorted(groups)]
        self.labels = [g[0].label for g in self.groups for _ in range(views)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups) * self.views

    def location_of(self, i: int) -> PairLocation:
        group = self.groups[i // self.views]
        return group[(i % self.views) % len(group)]

    def render(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        loc = self.location_of(i)
        rng = _rng(self.seed, epoch, i)
        sibs = self.groups[i // self.views]
        sat_loc = sibs[int(rng.integers(len(sibs)))] if len(sibs) > 1 else loc
        sat, _ = satellite_crop(sat_loc.raster, sat_loc.cx, sat_loc.cy, sat_loc.footprint_m, self.size)
        return render_drone(loc, rng, (self.size, self.size)).image, sat, rng

    def __getitem__(self, i: int):
        drone, sat, rng = self.render(i, self.epoch)
        if self.transform is None:
            return drone, sat, self.labels[i]
        dt, st = self.transform(drone, sat, rng)
        return dt, st, self.labels[i]


class Images(Dataset):
    """Single images for CDTS: `train=True` augments (flip, photometric, dropout; satellites also a
    random multiple of 90°), else the evaluation preprocessing. Item = (tensor, index)."""

    def __init__(self, items: Sequence[Item], satellite: Sequence[bool], transform: PairTransform, seed: int,
                 train: bool) -> None:
        self.items, self.satellite, self.transform = list(items), list(satellite), transform
        self.seed, self.train, self.epoch = seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img = _load(self.items[i])
        if self.train:
            return self.transform.single(img, _rng(self.seed, self.epoch, i, 1), rotate=self.satellite[i]), i
        t = self.transform
        return to_tensor(to_model_input(img, t.size), t.mean, t.std), i


# ---------------------------------------------------------------- rasters


def auto_footprint(path: str) -> float:
    """A location's ground size when none is given: ~50 m like a drone photo, but at least 96 raster
    pixels (coarse rasters need a wider view to show anything) and at most half the raster's short side."""
    info = open_raster(path)
    gsd = max(info.gsd_x_m, info.gsd_y_m)
    return float(min(max(50.0, 96 * gsd), min(info.width_m, info.height_m) / 2.0))


class RasterEntry(NamedTuple):
    """One raster to train on: its path, location footprint and the part of it that may be used."""

    path: str
    footprint_m: float
    region: Region = WHOLE


def raster_entries(data: str | Path, footprint_m: float | None) -> list[RasterEntry]:
    """Rasters to train on from a raster file, a folder of rasters, or a list file (see module doc)."""
    p = Path(data)
    if p.is_dir():
        paths = sorted(str(q) for q in p.iterdir() if q.suffix.lower() in RASTER_SUFFIXES and q.is_file())
        if not paths:
            raise InputError(f"{p} holds no rasters ({', '.join(RASTER_SUFFIXES)}); check --data.")
        entries: list[tuple[str, float | None, Region]] = [(q, footprint_m, WHOLE) for q in paths]
    elif p.suffix.lower() in RASTER_SUFFIXES:
        entries = [(str(p), footprint_m, WHOLE)]
    else:
        entries = []
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise InputError(f"{p} is neither a raster nor a text list of rasters; check --data.") from None
        for n, line in enumerate(lines, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            path = Path(parts[0]) if Path(parts[0]).is_absolute() else p.parent / parts[0]
            region, rest = WHOLE, []
            for part in parts[1:]:
                if part.startswith("region="):
                    try:
                        region = Region.parse(part.removeprefix("region="))
                    except InputError as exc:
                        raise InputError(f"{p}:{n}: {exc}") from None
                else:
                    rest.append(part)
            try:
                fp = float(rest[0]) if rest else footprint_m
            except ValueError:
                raise InputError(f"{p}:{n}: footprint {rest[0]!r} is not a number of metres.") from None
            if not path.is_file():
                raise InputError(f"{p}:{n}: raster {path} not found.")
            entries.append((str(path), fp, region))
        if not entries:
            raise InputError(f"{p} lists no rasters; write one raster path per line.")
    return [RasterEntry(path, float(fp) if fp else auto_footprint(path), region) for path, fp, region in entries]


def raster_locations(entries: Sequence[RasterEntry], seed: int, grid_step: float = 0.75,
                     n_locations: int | None = None) -> list[PairLocation]:
    """A grid of locations over every raster; co-registered rasters share labels; dense labels 0..L-1.

    With `n_locations`, a seeded subset of that many labels (all rasters of a shared label kept).
    """
    found: list[PairLocation] = []
    for path, fp, region in entries:
        try:
            found += sample_locations([path], None, fp, seed, mode="grid", grid_step_m=grid_step * fp, region=region)
        except InputError as exc:
            log.warning("Skipping %s: %s", Path(path).name, exc)
    if not found:
        raise InputError("No location fits the rasters' valid data; use a smaller --footprint-m.")
    labels = _shared_labels(found)
    keep = sorted(set(labels))
    if n_locations is not None and n_locations < len(keep):
        keep = sorted(np.random.default_rng([seed, 7]).permutation(keep)[:n_locations].tolist())
    dense = {lab: k for k, lab in enumerate(keep)}
    return [PairLocation(loc.raster, f"{dense[lab]:04d}", dense[lab], loc.cx, loc.cy, loc.footprint_m, loc.group)
            for loc, lab in zip(found, labels) if lab in dense]


def _shared_labels(found: Sequence[PairLocation], tolerance: float = 0.1) -> list[int]:
    """One label per place: locations of different rasters in the same CRS, with the same footprint
    and centres within `tolerance` x footprint (co-registered years), share it."""
    labels: list[int] = []
    seen: list[tuple[str, float, float, float, int]] = []
    for loc in found:
        crs = open_raster(loc.raster).crs_wkt
        match = next((lab for c, x, y, fp, lab in seen if c == crs and abs(fp - loc.footprint_m) < 1e-6
                      and max(abs(x - loc.cx), abs(y - loc.cy)) <= tolerance * fp), None)
        if match is None:
            match = len({lab for *_, lab in seen})
            seen.append((crs, loc.cx, loc.cy, loc.footprint_m, match))
        labels.append(match)
    return labels


# ---------------------------------------------------------------- per layout


def read_train_records(layout: str, data: str, height: int | None) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(drone, satellite) records of a benchmark's training split."""
    sets = read_layout(layout, data, "train", height)
    return sets["drone"], sets["satellite"]


def record_pairs(pairs: Sequence[tuple[ImageRecord, ImageRecord]], transform: PairTransform | None, seed: int,
                 what: str) -> PairSource:
    labels_of = {loc: i for i, loc in enumerate(sorted({d.location for d, _ in pairs}))}
    labels = [labels_of[d.location] for d, _ in pairs]
    return PairSource(RecordPairs(pairs, labels, transform, seed), labels, len(labels_of),
                      f"{len(pairs)} pairs of {len(labels_of)} locations ({what})")


def benchmark_pairs(drone: Sequence[ImageRecord], satellite: Sequence[ImageRecord]
                    ) -> list[tuple[ImageRecord, ImageRecord]]:
    return PairedDataset(drone, satellite).pairs


def records_image_set(drone: Sequence[ImageRecord], satellite: Sequence[ImageRecord],
                      known_drone: set[str], known_locations: set[str]) -> ImageSet:
    """Every image once; a drone image is known (its location's label) when it was paired, a
    satellite image when its location was; all else gets -1."""
    locs = sorted(known_locations)
    lab = {loc: i for i, loc in enumerate(locs)}
    sats = list(dict.fromkeys(s.path for s in satellite))
    sat_loc = {s.path: s.location for s in satellite}
    return ImageSet(
        drone=[d.path for d in drone], satellite=sats,
        drone_known=np.array([lab[d.location] if d.path in known_drone else -1 for d in drone], np.int64),
        sat_known=np.array([lab.get(sat_loc[p], -1) for p in sats], np.int64),
        description=f"{len(drone)} drone and {len(sats)} satellite images, {len(locs)} known locations")


def raster_image_set(ds: RasterPairs, known_items: set[int]) -> ImageSet:
    """Materialise one fixed drone view per item (epoch 0's) and each location's tile, in memory."""
    drone, sat, d_known, s_known = [], [], [], []
    known_labels = {ds.labels[i] for i in known_items}
    for i in range(len(ds)):
        d, _, _ = ds.render(i, 0)
        drone.append(d)
        d_known.append(ds.labels[i] if i in known_items else -1)
    for loc in ds.locations:
        s, _ = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, ds.size)
        sat.append(s)
        s_known.append(loc.label if loc.label in known_labels else -1)
    return ImageSet(drone, sat, np.array(d_known, np.int64), np.array(s_known, np.int64),
                    f"{len(drone)} simulated drone views and {len(sat)} tiles, {len(known_labels)} known locations")


def raster_records(ds: RasterPairs) -> list[ImageRecord]:
    """One record per drone item (path = item index) and per location instance, for `split_paired`."""
    drone = [ImageRecord(str(i), ds.location_of(i).location, "drone", ds.location_of(i).group) for i in range(len(ds))]
    sats = [ImageRecord(f"sat{k}", loc.location, "satellite", loc.group) for k, loc in enumerate(ds.locations)]
    return drone + sats


def pair_subset(ds: RasterPairs, items: Sequence[int]) -> PairSource:
    sub = torch.utils.data.Subset(ds, list(items))
    sub.set_epoch = ds.set_epoch  # type: ignore[attr-defined]
    labels = [ds.labels[i] for i in items]
    return PairSource(sub, labels, max(ds.labels) + 1, f"{len(items)} simulated pairs of {len(set(labels))} locations")

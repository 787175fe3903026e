"""Drone-satellite pairs simulated from any georeferenced raster, where no benchmark exists.

A location is a ground point on a raster. Its satellite view is the north-up square crop of
`footprint_m` around it, read by GDAL straight at the model's input size (as the indexer reads
tiles); its drone views come from `model_backend.learn.datasets.synth.render_view` at the same centre with a
random tilt, heading, scale and camera look. Because both views are computed from the same
point, a pair is aligned by construction: the drone view's principal ray hits the crop centre.

Centres are snapped so the crop's pixel window is whole: the stored centre is exactly the centre
of the pixels read, and the drone view is rendered at that same point. Everything is drawn from
seeded generators, so the same seed gives the same locations and the same views.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch.utils.data import Dataset

from model_backend.core.errors import InputError
from model_backend.geo.raster import RasterInfo, dataset_mask, ground_resolution, open_raster
from model_backend.geo.reader import FILL_RGB, Stretch, compute_stretch
from model_backend.learn.datasets.common import ImageRecord
from model_backend.learn.datasets.region import WHOLE, Region
from model_backend.learn.datasets.synth import PHOTO_RANGES, SyntheticView, ViewSpec, render_view
from model_backend.learn.datasets.transforms import PairTransform

log = logging.getLogger(__name__)

BLACK_MAX = 3
"""Without a dataset mask, pixels <= this in every band are nodata (undeclared black collars), as in synth."""


@dataclass(frozen=True)
class PairLocation:
    """One simulated location: where it is and how much ground its satellite tile covers."""

    raster: str
    location: str
    """Id, zero-padded like the benchmarks' folder names ("0007")."""
    label: int
    cx: float
    """Crop centre, raster CRS: the exact centre of the pixel window read."""
    cy: float
    footprint_m: float
    group: str = ""
    """Source raster's stem: the stratum for few-shot splits."""


@dataclass
class SimulatedPair:
    drone: np.ndarray
    """(H, W, 3) uint8, from `render_view`."""
    satellite: np.ndarray
    """(size, size, 3) uint8, north-up."""
    location: PairLocation
    drone_view: SyntheticView
    """Its spec's (cx, cy) is the truth centre: equal to the location's."""


@lru_cache(maxsize=16)
def _info(path: str) -> RasterInfo:
    return open_raster(path)


@lru_cache(maxsize=16)
def _stretch(info: RasterInfo) -> Stretch:
    return compute_stretch(info)


def local_gsd(info: RasterInfo, px: float, py: float) -> tuple[float, float]:
    """Ground metres per pixel at a pixel position: Mercator and degree rasters vary across the map."""
    shifted = info.affine * Affine.translation(px - 32.0, py - 32.0)
    return ground_resolution(info.crs_wkt, shifted, 64, 64)


def crop_window(info: RasterInfo, cx: float, cy: float, footprint_m: float) -> Window:
    """Whole-pixel window of side `footprint_m` centred on (cx, cy) (snapped centres fall exactly mid-window)."""
    px, py = ~info.affine * (cx, cy)
    gx, gy = local_gsd(info, px, py)
    w, h = _side(footprint_m / gx, px), _side(footprint_m / gy, py)
    return Window(round(px - w / 2.0), round(py - h / 2.0), w, h)


def _side(n_px: float, centre: float) -> int:
    """Whole pixels across, floor or ceil of `n_px`: the one that puts `centre` closest to mid-window.

    A snapped centre sits on a pixel edge or a pixel centre, which only an even or only an odd side
    fits exactly; choosing by that parity, not by rounding `n_px`, keeps the window of a stored
    centre identical when it is recomputed (the local scale may differ in the 9th digit).
    """
    cands = sorted({max(1, math.floor(n_px)), max(1, math.ceil(n_px))}, key=lambda s: (abs(s - n_px), s))
    return min(cands, key=lambda s: abs((centre - s / 2.0) - round(centre - s / 2.0)) > 1e-6)


def _valid(ds: rasterio.io.DatasetReader, info: RasterInfo, win: Window, shape: tuple[int, int],
           raw: np.ndarray | None = None) -> np.ndarray:
    if info.has_mask:
        return dataset_mask(ds, window=win, out_shape=shape, resampling=Resampling.nearest) > 0
    if raw is None:
        raw = ds.read(list(dict.fromkeys(info.rgb_bands)), window=win, out_shape=(len(set(info.rgb_bands)), *shape),
                      resampling=Resampling.nearest)
    return (raw > BLACK_MAX).any(axis=0)


def _inside(info: RasterInfo, win: Window) -> bool:
    return win.col_off >= 0 and win.row_off >= 0 and win.col_off + win.width <= info.width \
        and win.row_off + win.height <= info.height


def satellite_crop(raster: str, cx: float, cy: float, footprint_m: float, size: int) -> tuple[np.ndarray, float]:
    """North-up crop as (size, size, 3) uint8 and its valid fraction; invalid pixels get the fill colour."""
    info = _info(str(raster))
    win = crop_window(info, cx, cy, footprint_m)
    if not _inside(info, win):
        raise InputError(f"A {footprint_m:g} m crop at ({cx:.1f}, {cy:.1f}) leaves {Path(raster).name}.")
    down = win.width >= size
    with rasterio.open(info.path) as ds:
        raw = ds.read(list(info.rgb_bands), window=win, out_shape=(3, size, size),
                      resampling=Resampling.average if down else Resampling.bilinear)
        valid = _valid(ds, info, win, (size, size), raw)
    rgb = np.moveaxis(_stretch(info).apply(raw), 0, -1)
    if not valid.all():
        rgb = np.where(valid[..., None], rgb, FILL_RGB)
    return np.ascontiguousarray(rgb, dtype=np.uint8), float(valid.mean())


def _area_ok(ds: rasterio.io.DatasetReader, info: RasterInfo, win: Window, min_valid: float,
             region: Region = WHOLE) -> bool:
    # A region lies within the raster (fractions 0..1), so holding the window is the bounds check too.
    if not region.holds(info.width, info.height, win.col_off, win.row_off,
                        win.col_off + win.width, win.row_off + win.height):
        return False
    side = max(8, min(64, int(max(win.width, win.height))))
    return float(_valid(ds, info, win, (side, side)).mean()) >= min_valid


def sample_locations(rasters: Sequence[str | Path], n: int | None, footprint_m: float, seed: int, *,
                     mode: str = "random", margin: float = 1.6, separation: float = 1.0, min_valid: float = 0.995,
                     grid_step_m: float | None = None, max_tries: int = 400,
                     region: Region = WHOLE) -> list[PairLocation]:
    """Location centres over one or more rasters, skipping nodata, deterministic for a seed.

    The square of side `margin x footprint_m` around a centre must be inside the raster and valid,
    so a tilted, rotated drone view of the location (which sees more ground than the tile) never
    shows fill. `mode="random"`: `n` centres spread evenly over the rasters, at least
    `separation x footprint_m` apart (Chebyshev) so two locations never share their tile;
    `mode="grid"`: every valid centre of a grid with step `grid_step_m` (default the footprint),
    or a seeded subset of `n` of them. Rasters too small for the margin square are skipped.
    `region`: the margin square must also lie in that part of each raster (a spatial hold-out).
    """
    if footprint_m <= 0 or margin < 1.0:
        raise InputError(f"Footprint must be positive and margin >= 1, got {footprint_m} and {margin}.")
    if mode not in ("random", "grid"):
        raise InputError(f"Unknown sampling mode {mode!r}; use 'random' or 'grid'.")
    if mode == "random" and not n:
        raise InputError("Random sampling needs a number of locations.")
    infos = [_info(str(r)) for r in rasters]
    usable = [i for i in infos if min(i.width_m, i.height_m) > margin * footprint_m]
    if not usable:
        raise InputError(f"No raster is larger than {margin * footprint_m:g} m ({margin:g} x the footprint); "
                         "use a smaller footprint.")
    rng = np.random.default_rng(seed)
    found: list[tuple[RasterInfo, float, float]] = []
    for k, info in enumerate(usable):
        want = None if n is None else n // len(usable) + (1 if k < n % len(usable) else 0)
        with rasterio.open(info.path) as ds:
            found += _grid(ds, info, footprint_m, margin, min_valid, grid_step_m, want, rng, region) \
                if mode == "grid" else \
                _random(ds, info, footprint_m, margin, min_valid, separation, want or 0, rng, max_tries, region)
    if n is not None and len(found) < n:
        raise InputError(f"Only {len(found)} of {n} locations of {footprint_m:g} m fit the rasters' valid data; "
                         "use a smaller footprint, fewer locations or more rasters.")
    return [PairLocation(i.path, f"{k:04d}", k, x, y, footprint_m, Path(i.path).stem)
            for k, (i, x, y) in enumerate(found)]


def _snap(info: RasterInfo, px: float, py: float, footprint_m: float) -> tuple[float, float, Window]:
    cx, cy = info.affine * (px, py)
    win = crop_window(info, cx, cy, footprint_m)
    sx, sy = info.affine * (win.col_off + win.width / 2.0, win.row_off + win.height / 2.0)
    return sx, sy, win


def _margin_window(info: RasterInfo, win: Window, margin: float) -> Window:
    mw, mh = win.width * margin, win.height * margin
    cx, cy = win.col_off + win.width / 2.0, win.row_off + win.height / 2.0
    return Window(math.floor(cx - mw / 2.0), math.floor(cy - mh / 2.0), math.ceil(mw), math.ceil(mh))


def _random(ds, info, footprint_m, margin, min_valid, separation, want, rng, max_tries, region=WHOLE):
    out: list[tuple[RasterInfo, float, float]] = []
    pix: list[tuple[float, float, float]] = []
    for _ in range(max_tries * max(want, 1)):
        if len(out) >= want:
            break
        sx, sy, win = _snap(info, rng.uniform(0, info.width), rng.uniform(0, info.height), footprint_m)
        c = (win.col_off + win.width / 2.0, win.row_off + win.height / 2.0)
        if any(max(abs(c[0] - a), abs(c[1] - b)) < separation * s for a, b, s in pix):
            continue
        if _area_ok(ds, info, _margin_window(info, win, margin), min_valid, region):
            out.append((info, sx, sy))
            pix.append((c[0], c[1], float(max(win.width, win.height))))
    return out


def _grid(ds, info, footprint_m, margin, min_valid, step_m, want, rng, region=WHOLE):
    step_x, step_y = (step_m or footprint_m) / info.gsd_x_m, (step_m or footprint_m) / info.gsd_y_m
    out = []
    for py in np.arange(step_y / 2.0, info.height, step_y):
        for px in np.arange(step_x / 2.0, info.width, step_x):
            sx, sy, win = _snap(info, float(px), float(py), footprint_m)
            if _area_ok(ds, info, _margin_window(info, win, margin), min_valid, region):
                out.append((info, sx, sy))
    if want is not None and len(out) > want:
        out = [out[i] for i in sorted(rng.permutation(len(out))[:want])]
    return out


def drone_spec(loc: PairLocation, rng: np.random.Generator, *, footprint_m: float | None = None,
               max_tilt_deg: float = 30.0, scale_range: tuple[float, float] = (0.85, 1.15),
               photometric: bool = True) -> ViewSpec:
    """A random camera over the location: any heading, mostly-forward tilt, scale and look jitter."""
    heading = float(rng.uniform(0.0, 360.0))
    tilt = float(rng.uniform(0.0, max_tilt_deg))
    photo: dict = {}
    if photometric:
        photo = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PHOTO_RANGES.items()}
        photo["jpeg_quality"] = int(rng.integers(60, 96))
    return ViewSpec(loc.cx, loc.cy, footprint_m or loc.footprint_m, heading_deg=heading, tilt_deg=tilt,
                    tilt_azimuth_deg=float((heading + rng.normal(0.0, 20.0)) % 360.0),
                    scale=float(rng.uniform(*scale_range)), **photo)


def render_drone(loc: PairLocation, rng: np.random.Generator, size: tuple[int, int], *, min_valid: float = 0.98,
                 **spec_kw) -> SyntheticView:
    """Render a drone view; a steep draw that reaches past valid data is redrawn flatter (4 tries, then nadir)."""
    tilt = float(spec_kw.pop("max_tilt_deg", 30.0))
    view = None
    for attempt in range(5):
        spec = drone_spec(loc, rng, max_tilt_deg=tilt if attempt < 4 else 0.0, **spec_kw)
        view = render_view(loc.raster, spec, size=size)
        if view.valid_fraction >= min_valid:
            return view
        tilt /= 2.0
    return view  # type: ignore[return-value]   # the nadir view of a margin-checked location


def render_pair(loc: PairLocation, rng: np.random.Generator, size: int, *, drone_size: tuple[int, int] | None = None,
                **spec_kw) -> SimulatedPair:
    """One (drone, satellite) pair of a location; the satellite crop is the same for every draw."""
    sat, _ = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, size)
    view = render_drone(loc, rng, drone_size or (size, size), **spec_kw)
    return SimulatedPair(view.image, sat, loc, view)


class RasterPairDataset(Dataset):
    """`views_per_location` simulated drone views of each location, each with its satellite crop.

    Item i is drone view i % views of location i // views: (drone, satellite, label), tensors when a
    transform is given, else uint8 arrays. Views are drawn from (seed, epoch, i): the same for the
    same epoch, new ones after `set_epoch`, so training sees fresh cameras every epoch.
    """

    def __init__(self, locations: Sequence[PairLocation], views_per_location: int = 4, *, size: int = 224,
                 seed: int = 0, transform: PairTransform | None = None, **spec_kw) -> None:
        if not locations or views_per_location < 1:
            raise InputError("A raster pair dataset needs at least one location and one view per location.")
        self.locations = list(locations)
        self.views, self.size, self.seed = views_per_location, size, seed
        self.transform, self.spec_kw = transform, spec_kw
        self.labels = [loc.label for loc in self.locations for _ in range(views_per_location)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.locations) * self.views

    def records(self) -> list[ImageRecord]:
        """Records for `split_paired`: one per drone item (path "<raster>#<item>") and one satellite
        record per location; `item_of` turns a drone record back into the item index."""
        drone = [ImageRecord(f"{self.locations[i // self.views].raster}#{i}", self.locations[i // self.views].location,
                             "drone", self.locations[i // self.views].group) for i in range(len(self))]
        return drone + [ImageRecord(f"{loc.raster}#satellite", loc.location, "satellite", loc.group)
                        for loc in self.locations]

    @staticmethod
    def item_of(record: ImageRecord) -> int:
        return int(record.path.rsplit("#", 1)[1])

    def __getitem__(self, i: int):
        loc = self.locations[i // self.views]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        pair = render_pair(loc, rng, self.size, **self.spec_kw)
        if self.transform is None:
            return pair.drone, pair.satellite, loc.label
        d, s = self.transform(pair.drone, pair.satellite, rng)
        return d, s, loc.label


def random_crops(rasters: Sequence[str | Path], n: int, footprint_range_m: tuple[float, float], size: int,
                 seed: int, *, min_pixels: int = 128, min_valid: float = 0.99) -> list[np.ndarray]:
    """`n` north-up crops of random footprint and place: distractor tiles for retrieval checks.

    Crops may overlap (a 200 m raster holds few disjoint tiles); rasters whose pixels are too
    coarse to give `min_pixels` across the smallest footprint are left out (a 40-pixel crop of a
    5 m raster is a blur no one would mistake for a building).
    """
    rng = np.random.default_rng(seed)
    infos = [_info(str(r)) for r in rasters]
    lo, hi = footprint_range_m
    infos = [i for i in infos if lo / max(i.gsd_x_m, i.gsd_y_m) >= min_pixels and min(i.width_m, i.height_m) > lo]
    if not infos:
        raise InputError(f"No raster is fine and large enough for {lo:g} m crops of {min_pixels} pixels.")
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise InputError(f"Found only {len(out)} of {n} valid crops; use smaller footprints or more rasters.")
        info = infos[len(out) % len(infos)]
        f = float(rng.uniform(lo, min(hi, 0.95 * min(info.width_m, info.height_m))))
        sx, sy, win = _snap(info, rng.uniform(0, info.width), rng.uniform(0, info.height), f)
        if not _inside(info, win):
            continue
        crop, valid = satellite_crop(info.path, sx, sy, f, size)
        if valid >= min_valid:
            out.append(crop)
    return out

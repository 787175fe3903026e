"""Simulated flights: a drone's photo sequence over a real raster, with exact ground truth.

A flight is what an analyst brings: photos seconds apart along a path, each overlapping the last,
their EXIF carrying the time (and, on request, a GPS position). Paths are a survey lawnmower
(parallel legs joined by turns) or a free path (a smooth random walk that turns back at the
edges); the camera heads along the track with a little yaw noise, tilts a few degrees, changes
altitude smoothly (the footprint grows and shrinks) and its colour varies photo to photo. Photos
may come from another raster than the map (another year of the same area: the cross-year flight).

Each photo is written with `synth.save_view` (JPEG + `<stem>.truth.json`) and EXIF
DateTimeOriginal + SubSecTimeOriginal, so the flight reader orders it exactly as a real flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from model_backend.core.errors import InputError
from model_backend.geo.geodesy import to_wgs84
from model_backend.geo.raster import RasterInfo, open_raster
from model_backend.learn.datasets.region import WHOLE, Region
from model_backend.learn.datasets.synth import PHOTO_RANGES, SyntheticView, ViewSpec, render_view, save_view

PATTERNS = ("lawnmower", "free", "replay")
START = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class FlightPlan:
    """What to fly; `overlap` is the forward overlap of consecutive photos (0.5-0.7 for a survey)."""

    pattern: str = "lawnmower"
    n_photos: int = 40
    footprint_m: float = 50.0
    overlap: float = 0.6
    sidelap: float = 0.3
    """Overlap between lawnmower legs."""
    speed_m_s: float = 8.0
    max_tilt_deg: float = 10.0
    altitude_change: float = 0.2
    """The footprint varies smoothly within 1 +- this along the flight (climbs and descents)."""
    heading_noise_deg: float = 5.0
    turn_deg: float = 12.0
    """Free path: standard deviation of the heading change per photo."""
    region: Region = WHOLE
    photometric: bool = True
    replay: tuple[tuple[float, float, float], ...] | None = None
    """Pattern 'replay': a real flight's photos as (x east, y south, seconds), metres from its first photo
    (`replay_from_log`); flown at its own turns and times, scaled so consecutive photos overlap by `overlap`."""
    featureless: tuple[int, int] | None = None
    """(first photo, count): a stretch flown over ground with nothing to match, e.g. a uniform field or
    haze - those photos keep only a faint trace of the ground (`flatten`), as over a bare field."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise InputError(f"Unknown flight pattern {self.pattern!r}; use one of {', '.join(PATTERNS)}.")
        if not 0.0 <= self.overlap < 1.0 or not 0.0 <= self.sidelap < 1.0:
            raise InputError("Overlap and sidelap are fractions in [0, 1).")
        if self.pattern == "replay" and not self.replay:
            raise InputError("A replayed flight needs its photos' positions (replay_from_log).")
        if self.n_photos < 1 or self.footprint_m <= 0 or self.speed_m_s <= 0:
            raise InputError("A flight needs photos, a positive footprint and a positive speed.")


@dataclass
class FlightPhoto:
    path: str
    spec: ViewSpec
    """The truth: spec.cx, spec.cy is the photo's ground centre in the map's CRS."""
    time_s: float
    """Seconds after the flight's start (EXIF holds START + this)."""
    valid_fraction: float
    featureless: bool = False
    """Flown over the plan's featureless stretch (its image flattened)."""


def _box(info: RasterInfo, plan: FlightPlan) -> tuple[float, float, float, float]:
    """Pixel box the photo centres stay in: the region, less a margin that holds a tilted, larger view."""
    c0, r0, c1, r1 = plan.region.pixels(info.width, info.height)
    reach_m = 0.5 * plan.footprint_m * (1.0 + plan.altitude_change) * math.hypot(4, 3) / 3 * \
        (1.0 + math.tan(math.radians(plan.max_tilt_deg)))
    mx, my = reach_m / info.gsd_x_m + 2, reach_m / info.gsd_y_m + 2
    if c1 - c0 <= 2 * mx or r1 - r0 <= 2 * my:
        raise InputError(f"A flight of {plan.footprint_m:g} m photos does not fit in the raster's region "
                         f"{plan.region.text()}; use a smaller footprint.")
    return c0 + mx, r0 + my, c1 - mx, r1 - my


def plan_path(info: RasterInfo, plan: FlightPlan, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) photo centres in metres from the box's top-left corner (x east, y south), and headings."""
    x0, y0, x1, y1 = _box(info, plan)
    w_m, h_m = (x1 - x0) * info.gsd_x_m, (y1 - y0) * info.gsd_y_m
    step = (1.0 - plan.overlap) * plan.footprint_m
    n = plan.n_photos
    if plan.pattern == "replay":
        return _replayed(plan, w_m, h_m)
    if plan.pattern == "lawnmower":
        along_x = bool(rng.integers(2)) if w_m > 2 * plan.footprint_m and h_m > 2 * plan.footprint_m else w_m >= h_m
        length, across = (w_m, h_m) if along_x else (h_m, w_m)
        spacing = (1.0 - plan.sidelap) * plan.footprint_m
        legs = max(1, min(int(across // spacing) + 1, math.ceil(n * step / max(length, step))))
        leg_len = min(length, n * step / legs + step)
        start_a = rng.uniform(0, length - leg_len) if length > leg_len else 0.0
        start_c = rng.uniform(0, max(0.0, across - (legs - 1) * spacing))
        pts = []
        for k in range(legs):
            a = np.arange(0.0, leg_len, step)
            a = a if k % 2 == 0 else a[::-1]
            for v in a:
                pts.append((start_a + v, start_c + k * spacing))
            if len(pts) >= n:
                break
        while len(pts) < n:  # not enough legs fit: fly the pattern back
            pts += pts[-2::-1][: n - len(pts)]
        p = np.array(pts[:n], np.float64)
        xy = p if along_x else p[:, ::-1]
    else:
        xy = np.empty((n, 2))
        pos = np.array([rng.uniform(0.2, 0.8) * w_m, rng.uniform(0.2, 0.8) * h_m])
        head = rng.uniform(0, 2 * math.pi)
        for i in range(n):
            xy[i] = pos
            for _ in range(50):
                head += math.radians(rng.normal(0.0, plan.turn_deg))
                nxt = pos + step * np.array([math.sin(head), -math.cos(head)])
                if 0 <= nxt[0] <= w_m and 0 <= nxt[1] <= h_m:
                    break
                head = math.atan2(w_m / 2 - pos[0], -(h_m / 2 - pos[1])) + rng.normal(0, 0.3)
            pos = np.clip(nxt, 0, [w_m, h_m])
    return xy


def _replayed(plan: FlightPlan, w_m: float, h_m: float) -> np.ndarray:
    """The real path scaled so its median step is (1 - overlap) footprints, shrunk further to fit, centred."""
    path = np.array([(x, y) for x, y, _ in plan.replay or ()], np.float64)[: plan.n_photos]
    steps = np.hypot(*np.diff(path, axis=0).T) if len(path) > 1 else np.array([1.0])
    scale = (1.0 - plan.overlap) * plan.footprint_m / max(float(np.median(steps)), 1e-9)
    extent = np.ptp(path, axis=0)
    scale = min(scale, *(limit / e for limit, e in zip((w_m, h_m), extent) if e > 0))
    xy = (path - path.min(axis=0)) * scale
    return xy + (np.array([w_m, h_m]) - xy.max(axis=0)) / 2.0


def replay_from_log(csv_path: str | Path, first: int = 0, count: int | None = None
                    ) -> tuple[tuple[float, float, float], ...]:
    """A real flight's track from a UAV-VisLoc-style log (`date`, `lat`, `lon` per photo): (x east, y south,
    seconds) from its first row, in the log's order - what `FlightPlan(pattern='replay')` flies."""
    from model_backend.geo.exif import read_visloc_log

    rows = list(read_visloc_log(str(csv_path)).values())[first:]
    rows = [r for r in rows if r.lat is not None and r.lon is not None and r.taken_s is not None][:count]
    if len(rows) < 2:
        raise InputError(f"{csv_path} holds fewer than two positioned, timed photos from row {first}.")
    lat0, lon0, t0 = rows[0].lat, rows[0].lon, rows[0].taken_s
    m_lat = 111_132.0
    m_lon = 111_320.0 * math.cos(math.radians(lat0))
    return tuple(((r.lon - lon0) * m_lon, -(r.lat - lat0) * m_lat, r.taken_s - t0) for r in rows)


def _headings(xy: np.ndarray) -> np.ndarray:
    """Direction of travel at each photo, degrees clockwise from north (y of `xy` points south)."""
    d = np.gradient(xy, axis=0) if len(xy) > 1 else np.array([[0.0, -1.0]])
    return np.degrees(np.arctan2(d[:, 0], -d[:, 1])) % 360.0


def exif_bytes(when: datetime, lonlat: tuple[float, float] | None) -> bytes:
    ex = Image.Exif()
    ex[306] = when.strftime("%Y:%m:%d %H:%M:%S")
    ex[0x8769] = {36867: when.strftime("%Y:%m:%d %H:%M:%S"), 37521: f"{when.microsecond // 10000:02d}"}
    if lonlat is not None:
        def dms(v: float) -> tuple[float, float, float]:
            v = abs(v)
            d, m = int(v), int((v % 1) * 60)
            return float(d), float(m), round((v * 3600) % 60, 4)

        lon, lat = lonlat
        ex[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    return ex.tobytes()


def flatten(image: np.ndarray, rng: np.random.Generator, keep: float = 0.15) -> np.ndarray:
    """The photo of a featureless stretch: its ground's large-scale tone with `keep` of its contrast
    left, every edge blurred away, plus sensor noise - what a bare field or haze gives a camera."""
    img = Image.fromarray(image)
    soft = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=max(image.shape[:2]) / 40)), np.float32)
    mean = soft.reshape(-1, 3).mean(axis=0)
    out = mean + keep * (soft - mean) + rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def simulate_flight(map_raster: str | Path, plan: FlightPlan, seed: int, folder: str | Path, *,
                    photo_raster: str | Path | None = None, size: tuple[int, int] = (640, 480),
                    gps: bool = False, gps_error_m: float = 5.0) -> list[FlightPhoto]:
    """Fly `plan` over `map_raster` (photos rendered from `photo_raster`, default the map) and write
    photo_000.jpg ... with EXIF time (and GPS with `gps`, off by `gps_error_m`); returns the truth."""
    info = open_raster(str(map_raster))
    source = str(photo_raster or map_raster)
    rng = np.random.default_rng(seed)
    xy = plan_path(info, plan, rng)
    heads = (_headings(xy) + rng.normal(0.0, plan.heading_noise_deg, len(xy))) % 360.0
    x0, y0, _, _ = _box(info, plan)
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(15, 40)
    step = (1.0 - plan.overlap) * plan.footprint_m
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_ll = to_wgs84(info.crs_wkt) if gps else None
    out: list[FlightPhoto] = []
    t = 0.0
    for i, ((mx, my), heading) in enumerate(zip(xy, heads)):
        cx, cy = info.affine * (x0 + mx / info.gsd_x_m, y0 + my / info.gsd_y_m)
        scale = 1.0 + plan.altitude_change * math.sin(phase + 2 * math.pi * i / period)
        photo: dict = {}
        if plan.photometric:
            photo = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PHOTO_RANGES.items()}
            photo["jpeg_quality"] = int(rng.integers(70, 96))
        spec = ViewSpec(float(cx), float(cy), plan.footprint_m, heading_deg=float(heading),
                        tilt_deg=float(rng.uniform(0, plan.max_tilt_deg)),
                        tilt_azimuth_deg=float((heading + rng.normal(0, 20)) % 360.0), scale=scale, **photo)
        view: SyntheticView = render_view(source, spec, size=size)
        bare = plan.featureless is not None and plan.featureless[0] <= i < sum(plan.featureless)
        if bare:
            view = replace(view, image=flatten(view.image, rng))
        path = folder / f"photo_{i:03d}.jpg"
        save_view(view, str(path))
        when = START.timestamp() + t
        lonlat = None
        if to_ll is not None:
            e = rng.normal(0, gps_error_m, 2)
            lonlat = to_ll.transform(cx + e[0], cy + e[1])
        Image.open(path).save(path, quality=95, exif=exif_bytes(datetime.fromtimestamp(when, UTC), lonlat))
        out.append(FlightPhoto(str(path), spec, t, view.valid_fraction, featureless=bare))
        t += step * scale / plan.speed_m_s * float(rng.uniform(0.9, 1.1))
        if plan.replay is not None and i + 1 < len(plan.replay):
            t = plan.replay[i + 1][2] - plan.replay[0][2]  # the real flight's clock
    return out

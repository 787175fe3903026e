"""Using what the photo says about itself: GPS window, heading, and whether it looks down.

A DJI photo usually carries its position (EXIF GPS), camera heading (XMP gimbal yaw) and pitch.
Each one saves work or catches a mistake: the GPS position restricts the search to a window
around it (`--prior-radius-m`), or, without a window, flags a best match that disagrees with it;
a known heading replaces the rotation search by one north-up embedding; and a gimbal pitched far
from nadir makes the photo's footprint a long trapezoid that a homography to an orthophoto fits
poorly, so verification is on by default only for photos that look down (or whose pitch is unknown).
Consumer GPS is good to a few metres and EXIF headings to ~10°, which is why they are priors:
the imagery still decides.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image
from pyproj import CRS, Geod, Transformer

from .exif import PhotoPriors
from .reader import FILL_RGB
from .tiling import TileGrid

MAX_OFF_NADIR_DEG = 30.0
"""Verification runs by default when the gimbal pitch is unknown or within this of straight down."""
DISAGREE_MIN_M = 50.0
"""A best match farther than max(this, 2 footprints) from the photo's GPS position is flagged."""

_GEOD = Geod(ellps="WGS84")


@lru_cache(maxsize=16)
def _from_wgs84(crs_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_wkt(crs_wkt), always_xy=True)


def gps_xy(priors: PhotoPriors, crs_wkt: str) -> tuple[float, float] | None:
    """The photo's GPS position in the raster's CRS, or None when it has none (or it cannot be projected)."""
    if priors.lon is None or priors.lat is None:
        return None
    x, y = _from_wgs84(crs_wkt).transform(priors.lon, priors.lat)
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return float(x), float(y)


def metres_per_unit(crs_wkt: str, x: float, y: float) -> tuple[float, float]:
    """Ground metres per CRS unit along x and y at (x, y): 1 for UTM, ~1/cos(lat) off for Mercator,
    ~10^5 for degrees. Measured geodesically over a short baseline, so any CRS works."""
    crs = CRS.from_wkt(crs_wkt)
    d = 1e-4 if crs.is_geographic else 10.0
    to_ll = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True)
    lon, lat = to_ll.transform([x - d, x + d, x, x], [y, y, y - d, y + d])
    mx = _GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2] / (2 * d)
    my = _GEOD.inv(lon[2], lat[2], lon[3], lat[3])[2] / (2 * d)
    return float(mx), float(my)


def ground_distance(crs_wkt: str, x0: float, y0: float, x1: float, y1: float) -> float:
    """Geodesic metres between two points of the raster CRS."""
    to_ll = Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)
    (lon0, lon1), (lat0, lat1) = to_ll.transform([x0, x1], [y0, y1])
    return float(_GEOD.inv(lon0, lat0, lon1, lat1)[2])


def restrict_to_radius(grid: TileGrid, cols: np.ndarray, rows: np.ndarray, scores: np.ndarray,
                       xy: tuple[float, float], radius_m: float) -> np.ndarray:
    """Scores with every tile whose centre lies farther than radius_m from xy set to NaN (not scored).

    Distances use the local metres-per-unit at the GPS point: exact enough within a search
    window of a few kilometres in any CRS, and vectorised over 10^6 tiles.
    """
    xs, ys = grid.centres(cols, rows)
    mx, my = metres_per_unit(grid.crs_wkt, *xy)
    d2 = ((np.asarray(xs) - xy[0]) * mx) ** 2 + ((np.asarray(ys) - xy[1]) * my) ** 2
    out = np.array(scores, dtype=np.float32, copy=True)
    out[d2 > radius_m ** 2] = np.nan
    return out


def gps_disagrees(distance_m: float, footprint_m: float) -> bool:
    """Whether a best match this far from the GPS position contradicts it (GPS is good to metres)."""
    return distance_m > max(DISAGREE_MIN_M, 2.0 * footprint_m)


def nadir_enough(priors: PhotoPriors, max_off_nadir_deg: float = MAX_OFF_NADIR_DEG) -> bool:
    """True when the gimbal pitch is unknown or within max_off_nadir_deg of straight down (DJI: -90)."""
    pitch = priors.gimbal_pitch_deg
    return pitch is None or abs(pitch + 90.0) <= max_off_nadir_deg


def north_up(photo: np.ndarray, yaw_deg: float, max_short_side: int = 512) -> np.ndarray:
    """The photo turned so north is up (its top faces yaw_deg, clockwise from north), for the query.

    Shrunk first (short side <= max_short_side; the query embeds a few hundred pixels anyway, and
    rotating 20 megapixels costs seconds). Corners the rotation uncovers get the tile reader's
    fill colour, and the query embeds the central square, as its rotation search would.
    """
    img = Image.fromarray(photo)
    f = max_short_side / min(img.size)
    if f < 1.0:
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)
    if abs(yaw_deg % 360.0) > 1e-6:
        img = img.rotate(-float(yaw_deg), resample=Image.Resampling.BILINEAR,
                         fillcolor=tuple(int(v) for v in FILL_RGB))
    return np.asarray(img, dtype=np.uint8)

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

import numpy as np
from PIL import Image

from model_backend.geo.exif import PhotoPriors
from model_backend.geo.geodesy import from_wgs84
from model_backend.geo.reader import FILL_RGB

MAX_OFF_NADIR_DEG = 30.0
"""Verification runs by default when the gimbal pitch is unknown or within this of straight down."""
DISAGREE_MIN_M = 50.0
"""A best match farther than max(this, 2 footprints) from the photo's GPS position is flagged."""

def gps_xy(priors: PhotoPriors, crs_wkt: str) -> tuple[float, float] | None:
    """The photo's GPS position in the raster's CRS, or None when it has none (or it cannot be projected)."""
    if priors.lon is None or priors.lat is None:
        return None
    x, y = from_wgs84(crs_wkt).transform(priors.lon, priors.lat)
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return float(x), float(y)


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

"""Ground distances and CRS <-> WGS84 transforms, for any CRS (projected, geographic, custom).

Every measure in metres goes through the WGS84 ellipsoid (pyproj's Geod) after a transform to
lon/lat, so UTM, Web Mercator and degrees all give true ground metres. Transformers are cached:
building one costs milliseconds, and a locate asks for the same few many times.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from pyproj import CRS, Geod, Transformer

GEOD = Geod(ellps="WGS84")


@lru_cache(maxsize=32)
def to_wgs84(crs_wkt: str) -> Transformer:
    """Transformer from a CRS (WKT or any pyproj input) to lon/lat (x = lon)."""
    return Transformer.from_crs(CRS.from_user_input(crs_wkt), CRS.from_epsg(4326), always_xy=True)


@lru_cache(maxsize=32)
def from_wgs84(crs_wkt: str) -> Transformer:
    """Transformer from lon/lat to a CRS."""
    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_user_input(crs_wkt), always_xy=True)


def ground_distance_m(crs_wkt: str, x0, y0, x1, y1) -> np.ndarray:
    """Geodesic metres between points (x0, y0) and (x1, y1) of the CRS; scalars or arrays."""
    tr = to_wgs84(crs_wkt)
    lon0, lat0 = tr.transform(x0, y0)
    lon1, lat1 = tr.transform(x1, y1)
    return np.asarray(GEOD.inv(lon0, lat0, lon1, lat1)[2], dtype=np.float64)


def ground_distance(crs_wkt: str, x0: float, y0: float, x1: float, y1: float) -> float:
    """Geodesic metres between two points of the CRS."""
    return float(ground_distance_m(crs_wkt, x0, y0, x1, y1))


def metres_per_unit(crs_wkt: str, x: float, y: float) -> tuple[float, float]:
    """Ground metres per CRS unit along x and y at (x, y): 1 for UTM, ~1/cos(lat) off for Mercator,
    ~10^5 for degrees. Measured geodesically over a short baseline, so any CRS works."""
    d = 1e-4 if CRS.from_user_input(crs_wkt).is_geographic else 10.0
    lon, lat = to_wgs84(crs_wkt).transform([x - d, x + d, x, x], [y, y, y - d, y + d])
    mx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2] / (2 * d)
    my = GEOD.inv(lon[2], lat[2], lon[3], lat[3])[2] / (2 * d)
    return float(mx), float(my)

"""Ranked candidate footprints: the best distinct tiles (`TileScores.top`), as places on the map.

A candidate is what every output carries (GeoJSON, GeoPackage, the dock's table): its centre in
the raster's CRS and in WGS84, its footprint polygon, and, once verification has run, the
photo's own footprint and how sure the match is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_backend.geo.geodesy import to_wgs84
from model_backend.locate.scores import TileScores


@dataclass
class Candidate:
    """One ranked match (see docs/CONTRACT.md)."""

    rank: int
    """1 = best."""
    score: float
    """Cosine similarity, higher is better."""
    x: float
    """Footprint centre in the raster's CRS."""
    y: float
    lon: float
    """Footprint centre in WGS84 degrees."""
    lat: float
    polygon: list[tuple[float, float]]
    """Closed ring in the raster's CRS, counter-clockwise: the photo's footprint when verified, else the tile."""
    # Geometric verification (model_backend.locate.verify); None while it has not run.
    verified: bool | None = None
    """True when a sane homography put the photo here with confidence >= the threshold."""
    confidence: float | None = None
    """Calibrated (on synthetic views) probability that the verified footprint is right; 0 if unverified."""
    inliers: int | None = None
    heading_deg: float | None = None
    """Direction of the photo's top edge, clockwise from grid north (verified only)."""
    gsd_m: float | None = None
    """The photo's mean ground metres per pixel (verified only)."""
    tile_x: float | None = None
    """Centre of the retrieved tile, raster CRS, when x/y were refined (by verification or the structure re-rank)."""
    tile_y: float | None = None
    tile_polygon: list[tuple[float, float]] | None = None
    structure: float | None = None
    """Edge-structure correlation where the photo fits best near this candidate (model_backend.locate.structure);
    None while the structure re-rank has not run or could not place it."""
    image_to_crs: list[list[float]] | None = None
    """3x3 homography from photo pixels (after EXIF orientation) to the raster CRS (verified only);
    kept for draping the photo on the map, never exported as an attribute."""

    def to_properties(self) -> dict:
        """The scalar fields as plain Python numbers, ready for GeoJSON / GPKG / Processing attributes.

        The verification fields are always there (export.MATCH_FIELDS), null while verification
        has not run, so every output has one schema.
        """
        props = {"rank": int(self.rank), "score": float(self.score), "x": float(self.x), "y": float(self.y),
                 "lon": float(self.lon), "lat": float(self.lat),
                 "verified": None, "confidence": None, "inliers": None, "heading_deg": None, "gsd_m": None,
                 "tile_x": None, "tile_y": None, "structure": _opt(self.structure)}
        if self.verified is not None:
            props.update(verified=bool(self.verified), confidence=float(self.confidence or 0.0),
                         inliers=int(self.inliers or 0), heading_deg=_opt(self.heading_deg),
                         gsd_m=_opt(self.gsd_m), tile_x=_opt(self.tile_x), tile_y=_opt(self.tile_y))
        elif self.tile_x is not None:  # moved by the structure re-rank: where its tile was
            props.update(tile_x=float(self.tile_x), tile_y=_opt(self.tile_y))
        return props


def _opt(v: float | None) -> float | None:
    return None if v is None else float(v)


def select_candidates(scores: TileScores, top_k: int, nms_iou: float) -> list[Candidate]:
    """The top_k best distinct tiles (`TileScores.top`) as ranked candidates with their geometry."""
    idx = scores.top(top_k, nms_iou)
    if idx.size == 0:
        return []
    cols, rows = scores.cols[idx], scores.rows[idx]
    xs, ys = scores.grid.centres(cols, rows)
    lons, lats = to_wgs84(scores.grid.crs_wkt).transform(xs, ys)
    return [
        Candidate(rank=r + 1, score=float(scores.values[i]), x=float(x), y=float(y), lon=float(lon),
                  lat=float(lat), polygon=scores.grid.polygon(int(c), int(w)))
        for r, (i, c, w, x, y, lon, lat) in enumerate(zip(idx, cols, rows, np.atleast_1d(xs), np.atleast_1d(ys),
                                                         np.atleast_1d(lons), np.atleast_1d(lats)))
    ]

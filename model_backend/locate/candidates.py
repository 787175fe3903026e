"""Ranked candidate footprints: the best tiles, with near-duplicates of better ones suppressed.

With 50 % overlap the runner-up to the best tile is almost always its neighbour, which tells
the analyst nothing new; greedy non-maximum suppression keeps the next *distinct* place
instead. All tiles of a grid share one size, so the IoU of two tiles follows from their
windows in source pixels alone: exact in any CRS and cheap enough to run over 10^6 scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model_backend.core.errors import InputError
from model_backend.geo.geodesy import to_wgs84
from model_backend.geo.tiling import TileGrid, clean_scores


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
    """Centre of the retrieved tile, raster CRS, when x/y were refined by verification."""
    tile_y: float | None = None
    tile_polygon: list[tuple[float, float]] | None = None
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
                 "tile_x": None, "tile_y": None}
        if self.verified is not None:
            props.update(verified=bool(self.verified), confidence=float(self.confidence or 0.0),
                         inliers=int(self.inliers or 0), heading_deg=_opt(self.heading_deg),
                         gsd_m=_opt(self.gsd_m), tile_x=_opt(self.tile_x), tile_y=_opt(self.tile_y))
        return props


def _opt(v: float | None) -> float | None:
    return None if v is None else float(v)


def tile_iou(grid: TileGrid, col: int, row: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """IoU of tile (col, row) with each of the tiles (cols, rows), from their pixel windows."""
    dx = np.abs(np.asarray(cols, dtype=np.float64) - col) * grid.step_x
    dy = np.abs(np.asarray(rows, dtype=np.float64) - row) * grid.step_y
    inter = np.clip(grid.tile_w - dx, 0, None) * np.clip(grid.tile_h - dy, 0, None)
    area = grid.tile_w * grid.tile_h
    return inter / (2 * area - inter)


def select_candidates(grid: TileGrid, cols: np.ndarray, rows: np.ndarray, scores: np.ndarray,
                      top_k: int, nms_iou: float) -> list[Candidate]:
    """Greedy NMS over tile footprints: the top_k best tiles, none overlapping a better one by IoU > nms_iou.

    Only a short head of the ranking is ever sorted: one kept tile can suppress at most the
    (2k-1)^2 - 1 tiles overlapping it, so the best top_k * (2k-1)^2 scores always suffice for a
    grid without repeated tiles; the pool grows (x4) only when repeats exhaust it. Ties keep the
    earlier tile in the input order, so results are reproducible. Non-finite scores are ignored.
    """
    if top_k < 0 or int(top_k) != top_k:
        raise InputError(f"Number of candidates must be a whole number >= 0, got {top_k}.")
    if not 0.0 <= nms_iou <= 1.0 or math.isnan(nms_iou):
        raise InputError(f"NMS IoU must be between 0 and 1 (e.g. 0.1), got {nms_iou}.")
    cols, rows, scores = clean_scores(grid, cols, rows, scores)
    n = scores.size
    if top_k == 0 or n == 0:
        return []
    k = grid.cells_per_tile
    pool = min(n, max(64, int(top_k) * (2 * k - 1) ** 2))
    while True:
        order = _head(scores, pool)
        kept = _greedy(grid, cols[order], rows[order], int(top_k), nms_iou)
        if len(kept) >= top_k or pool >= n:
            break
        pool = min(n, pool * 4)
    idx = order[kept]
    xs, ys = grid.centres(cols[idx], rows[idx])
    lons, lats = to_wgs84(grid.crs_wkt).transform(xs, ys)
    return [
        Candidate(rank=r + 1, score=float(scores[i]), x=float(x), y=float(y), lon=float(lon), lat=float(lat),
                  polygon=grid.polygon(int(cols[i]), int(rows[i])))
        for r, (i, x, y, lon, lat) in enumerate(zip(idx, np.atleast_1d(xs), np.atleast_1d(ys),
                                                   np.atleast_1d(lons), np.atleast_1d(lats)))
    ]


def _head(scores: np.ndarray, m: int) -> np.ndarray:
    """Indexes of the m best scores, best first; ties in input order (stable)."""
    if m < scores.size:
        part = np.argpartition(-scores, m - 1)[:m]
        # argpartition may cut a tie group arbitrarily; take every member of the boundary score.
        part = np.flatnonzero(scores >= scores[part].min())
    else:
        part = np.arange(scores.size)
    return part[np.argsort(-scores[part], kind="stable")]


def _greedy(grid: TileGrid, cols: np.ndarray, rows: np.ndarray, top_k: int, nms_iou: float) -> list[int]:
    """Walk tiles best first, keeping one unless it overlaps a kept tile by more than nms_iou."""
    kept: list[int] = []
    kc = np.empty(top_k, dtype=np.int64)
    kr = np.empty(top_k, dtype=np.int64)
    for i in range(cols.size):
        c, r = int(cols[i]), int(rows[i])
        if kept and tile_iou(grid, c, r, kc[:len(kept)], kr[:len(kept)]).max() > nms_iou:
            continue
        kc[len(kept)], kr[len(kept)] = c, r
        kept.append(i)
        if len(kept) == top_k:
            break
    return kept

"""The tile grid: square ground footprints laid over a raster at a fixed overlap.

The grid is defined in source pixels (floats), derived from the footprint in ground metres,
so it is exact in any CRS and never resamples the raster to a new projection. Tiles step by
`stride` x footprint; the step is also the heatmap's cell size, which is why 1/stride must be a
whole number: each tile then covers exactly k x k cells, and overlap-averaging needs no
interpolation (and no padding that would shift the output, a bug seen in a peer plugin).

The steps rarely end exactly at the raster's right and bottom edges: up to one step would never
be searched (a photo taken there could not be found). So a last column and row are aligned to
those edges; on the heatmap they are drawn in the next cells, less than one cell from their place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine

from model_backend.core.config import TilingConfig
from model_backend.core.errors import InputError
from model_backend.geo.raster import RasterInfo


@dataclass(frozen=True)
class TileGrid:
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    raster_width: int
    raster_height: int
    tile_w: float
    """Tile width in source pixels."""
    tile_h: float
    step_x: float
    """Step between tile origins (= heatmap cell width) in source pixels."""
    step_y: float
    cells_per_tile: int
    """k = 1/stride: a tile spans k x k heatmap cells."""
    n_cols: int
    n_rows: int
    footprint_m: float

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def n_tiles(self) -> int:
        return self.n_cols * self.n_rows

    @property
    def cell_cols(self) -> int:
        return self.n_cols - 1 + self.cells_per_tile

    @property
    def cell_rows(self) -> int:
        return self.n_rows - 1 + self.cells_per_tile

    @property
    def cell_transform(self) -> Affine:
        """Transform of the heatmap grid (one pixel per cell), aligned with the raster origin."""
        return self.affine * Affine.scale(self.step_x, self.step_y)

    @property
    def full_cols(self) -> int:
        """Columns on the regular step; a last column beyond them (`n_cols` - `full_cols` = 1) is
        aligned to the raster's right edge instead, so the strip the steps leave is searched too."""
        return _steps(self.raster_width, self.tile_w, self.step_x)

    @property
    def full_rows(self) -> int:
        return _steps(self.raster_height, self.tile_h, self.step_y)

    def origins(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left pixel corners of tiles: on the regular step, the edge-aligned last ones at the edges."""
        return (np.minimum(np.asarray(cols, dtype=np.float64) * self.step_x, self.raster_width - self.tile_w),
                np.minimum(np.asarray(rows, dtype=np.float64) * self.step_y, self.raster_height - self.tile_h))

    def window(self, col: int, row: int) -> tuple[float, float, float, float]:
        """Pixel window (x0, y0, width, height) of a tile, in source pixels."""
        x0, y0 = self.origins(np.array(col), np.array(row))
        return float(x0), float(y0), self.tile_w, self.tile_h

    def centres(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tile centres in the raster's CRS."""
        px, py = self.origins(cols, rows)
        px, py = px + self.tile_w / 2, py + self.tile_h / 2
        a = self.affine
        return a.a * px + a.b * py + a.c, a.d * px + a.e * py + a.f

    def polygon(self, col: int, row: int) -> list[tuple[float, float]]:
        """Closed ring of the tile's footprint in the raster's CRS, counter-clockwise on the map."""
        x0, y0, w, h = self.window(col, row)
        a = self.affine
        # Pixel rows grow southwards on a north-up raster, so this order is CCW in map space.
        corners = [(x0, y0 + h), (x0 + w, y0 + h), (x0 + w, y0), (x0, y0), (x0, y0 + h)]
        ring = [tuple(a * c) for c in corners]
        if _signed_area(ring) < 0:
            ring.reverse()
        return ring  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _signed_area(ring: list[tuple[float, float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def cells_per_tile(stride: float) -> int:
    if not 0 < stride <= 1:
        raise InputError(f"Stride {stride} must be in (0, 1]; use 0.5 for 50 % overlap.")
    k = round(1.0 / stride)
    if abs(k * stride - 1.0) > 1e-6:
        raise InputError(f"Stride {stride} must be 1/n (1, 0.5, 0.333, 0.25, ...) so tiles align with the heatmap.")
    return k


EDGE_MIN_STEP = 0.05
"""A remainder past the last regular tile wider than this share of a step gets an edge-aligned tile."""


def _steps(size: int, tile: float, step: float) -> int:
    """Tiles that fit on the regular step from the origin."""
    return int(math.floor((size - tile) / step + 1e-9)) + 1


def _with_edge(size: int, tile: float, step: float) -> int:
    """Regular tiles, plus one aligned to the far edge where they leave more than a sliver uncovered."""
    n = _steps(size, tile, step)
    rest = size - ((n - 1) * step + tile)
    return n + 1 if rest > EDGE_MIN_STEP * step else n


MIN_TILE_PX = 8
"""Fewer raster pixels across a tile than this and the tile holds nothing to match."""


def make_grid(info: RasterInfo, cfg: TilingConfig) -> TileGrid:
    """Lay the grid, refusing impossible or absurd jobs before any pixel is read."""
    if not cfg.footprint_m > 0:
        raise InputError(f"Footprint must be a positive number of metres, got {cfg.footprint_m}.")
    k = cells_per_tile(cfg.stride)
    tile_w = cfg.footprint_m / info.gsd_x_m
    tile_h = cfg.footprint_m / info.gsd_y_m
    if tile_w > info.width + 1e-6 or tile_h > info.height + 1e-6:
        raise InputError(
            f"Footprint {cfg.footprint_m:g} m is larger than the raster ({info.width_m:.0f} x {info.height_m:.0f} m); "
            "use a smaller --footprint-m."
        )
    if tile_w < MIN_TILE_PX or tile_h < MIN_TILE_PX:
        raise InputError(
            f"Footprint {cfg.footprint_m:g} m is only {min(tile_w, tile_h):.1f} pixels at this raster's "
            f"{info.gsd_x_m:.2f} m resolution; use a larger --footprint-m."
        )
    step_x, step_y = tile_w / k, tile_h / k
    n_cols = _with_edge(info.width, tile_w, step_x)
    n_rows = _with_edge(info.height, tile_h, step_y)
    grid = TileGrid(
        crs_wkt=info.crs_wkt, transform=info.transform, raster_width=info.width,
        raster_height=info.height, tile_w=tile_w, tile_h=tile_h, step_x=step_x, step_y=step_y,
        cells_per_tile=k, n_cols=n_cols, n_rows=n_rows, footprint_m=cfg.footprint_m,
    )
    if grid.n_tiles > cfg.max_tiles:
        suggest = cfg.footprint_m * math.sqrt(grid.n_tiles / cfg.max_tiles) * 1.05
        raise InputError(
            f"{grid.n_tiles:,} tiles would be needed (limit {cfg.max_tiles:,}); use a footprint of at least "
            f"{suggest:.0f} m, a larger stride, or clip the raster to your area of interest."
        )
    return grid

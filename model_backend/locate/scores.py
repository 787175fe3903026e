"""Tile scores as one value: which tiles of a grid were scored, how well, and at which heading.

A photo's scores against an index are used four ways: the best footprint size is the one whose
best score is highest, a GPS window keeps only nearby tiles, the candidates are the best distinct
tiles, and the heatmap spreads every score over the cells its tile covers. Passing the grid,
columns, rows and scores as four parallel arrays let any caller pair them wrongly; `TileScores`
keeps them together, checks them once, and answers each of those questions itself.

All tiles of a grid share one size, so overlaps (for NMS) and cell coverage (for the heatmap)
follow from tile indexes alone: exact in any CRS and cheap over 10^6 tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model_backend.core.errors import InputError
from model_backend.geo.geodesy import metres_per_unit
from model_backend.geo.tiling import TileGrid


@dataclass(frozen=True, eq=False)
class TileScores:
    """Scores of tiles (cols[i], rows[i]) of `grid`; NaN marks a tile that was not scored."""

    grid: TileGrid
    cols: np.ndarray
    """Tile column of each score (int64)."""
    rows: np.ndarray
    values: np.ndarray
    """Cosine similarity of each tile with the photo, its best over the query headings (float, as given)."""
    heading: np.ndarray | None = field(default=None)
    """Index of the query heading that gave each score (-1 where not scored); None when not kept."""

    def __post_init__(self) -> None:
        cols = np.asarray(self.cols).ravel()
        rows = np.asarray(self.rows).ravel()
        values = np.asarray(self.values).ravel()
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        if not cols.shape == rows.shape == values.shape:
            raise ValueError(f"cols, rows and scores differ in length: {cols.size}, {rows.size}, {values.size}")
        if cols.size and not (np.issubdtype(cols.dtype, np.integer) and np.issubdtype(rows.dtype, np.integer)):
            raise ValueError("cols and rows must be integer tile indexes")
        cols, rows = cols.astype(np.int64, copy=False), rows.astype(np.int64, copy=False)
        # Off-grid indexes are a caller's bug (they would land in the wrong cell), so they raise.
        if cols.size and (min(cols.min(), rows.min()) < 0
                          or cols.max() >= self.grid.n_cols or rows.max() >= self.grid.n_rows):
            raise ValueError(f"tile index outside the {self.grid.n_cols} x {self.grid.n_rows} grid")
        if self.heading is not None and np.asarray(self.heading).shape != values.shape:
            raise ValueError("heading and scores differ in length")
        object.__setattr__(self, "cols", cols)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "values", values)

    def __len__(self) -> int:
        return int(self.values.size)

    @property
    def scored(self) -> np.ndarray:
        """Mask of the tiles that have a finite score."""
        return np.isfinite(self.values)

    @property
    def best(self) -> float:
        """The highest score, or -inf when no tile was scored."""
        ok = self.scored
        return float(self.values[ok].max()) if ok.any() else -math.inf

    def spread(self) -> tuple[float, float]:
        """Median and standard deviation of the scored tiles ((0, 0) when none was): how far a tile stands out
        is measured in these, since raw cosines differ from bland to busy ground."""
        finite = self.values[self.scored]
        return (float(np.median(finite)), float(finite.std())) if finite.size else (0.0, 0.0)

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Tile centres in the grid's CRS."""
        x, y = self.grid.centres(self.cols, self.rows)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def within(self, xy: tuple[float, float], radius_m: float) -> TileScores:
        """The same tiles with every one whose centre lies farther than radius_m from xy unscored (NaN).

        Distances use the local metres-per-unit at xy: exact enough within a search window of a
        few kilometres in any CRS, and vectorised over 10^6 tiles.
        """
        xs, ys = self.centres()
        mx, my = metres_per_unit(self.grid.crs_wkt, *xy)
        far = ((xs - xy[0]) * mx) ** 2 + ((ys - xy[1]) * my) ** 2 > radius_m ** 2
        values = self.values.copy()
        values[far] = np.nan
        return TileScores(self.grid, self.cols, self.rows, values, self.heading)

    def top(self, k: int, nms_iou: float) -> np.ndarray:
        """Positions of the k best tiles, best first, none overlapping a better one by IoU > nms_iou.

        With 50 % overlap the runner-up to the best tile is almost always its neighbour; greedy
        non-maximum suppression keeps the next *distinct* place instead. Only a short head of
        the ranking is ever sorted: one kept tile can suppress at most the (2c-1)^2 - 1 tiles
        overlapping it (c cells per tile), so the best k * (2c-1)^2 scores suffice for a grid
        without repeated tiles; the pool grows (x4) only when repeats exhaust it. Ties keep the
        earlier tile, so results are reproducible. Unscored tiles are never chosen.
        """
        if k < 0 or int(k) != k:
            raise InputError(f"Number of candidates must be a whole number >= 0, got {k}.")
        if not 0.0 <= nms_iou <= 1.0 or math.isnan(nms_iou):
            raise InputError(f"NMS IoU must be between 0 and 1 (e.g. 0.1), got {nms_iou}.")
        finite = np.flatnonzero(self.scored)
        if k == 0 or finite.size == 0:
            return np.empty(0, dtype=np.int64)
        values = self.values[finite]
        c = self.grid.cells_per_tile
        pool = min(finite.size, max(64, int(k) * (2 * c - 1) ** 2))
        while True:
            order = _head(values, pool)
            kept = self._greedy(finite[order], int(k), nms_iou)
            if len(kept) >= k or pool >= finite.size:
                break
            pool = min(finite.size, pool * 4)
        return finite[order[kept]]

    def iou(self, col: int, row: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """IoU of tile (col, row) with each of the tiles (cols, rows), from their pixel windows."""
        g = self.grid
        x0, y0 = g.origins(np.array(col), np.array(row))  # edge-aligned last tiles sit at their true place
        xs, ys = g.origins(cols, rows)
        dx, dy = np.abs(xs - x0), np.abs(ys - y0)
        inter = np.clip(g.tile_w - dx, 0, None) * np.clip(g.tile_h - dy, 0, None)
        area = g.tile_w * g.tile_h
        return inter / (2 * area - inter)

    def _greedy(self, positions: np.ndarray, k: int, nms_iou: float) -> list[int]:
        """Walk tiles best first, keeping one unless it overlaps a kept tile by more than nms_iou."""
        kept: list[int] = []
        kc = np.empty(k, dtype=np.int64)
        kr = np.empty(k, dtype=np.int64)
        cols, rows = self.cols[positions], self.rows[positions]
        for i in range(positions.size):
            c, r = int(cols[i]), int(rows[i])
            if kept and self.iou(c, r, kc[:len(kept)], kr[:len(kept)]).max() > nms_iou:
                continue
            kc[len(kept)], kr[len(kept)] = c, r
            kept.append(i)
            if len(kept) == k:
                break
        return kept

    def heatmap(self, fill: float = np.nan) -> np.ndarray:
        """Overlap-averaged scores, shape (grid.cell_rows, grid.cell_cols), float32; `fill` where uncovered.

        The grid steps by exactly 1/c of a tile, so each tile covers a whole c x c block of cells
        and a cell's value is the plain mean of the scored tiles over it. Scores are binned onto
        the tile lattice (one bincount), then spread over their cells by 2c shifted slice
        additions (a separable box sum): O(c * cells) whatever the tile count, exact for any c
        (no cumulative-sum round-off), well under a second for 10^6 tiles. A tile given twice
        counts as two samples.
        """
        ok = self.scored
        cols, rows = self.cols[ok], self.rows[ok]
        values = self.values[ok].astype(np.float64)
        c, n_cols, n_rows = self.grid.cells_per_tile, self.grid.n_cols, self.grid.n_rows
        flat = rows * n_cols + cols
        tile_sum = np.bincount(flat, weights=values, minlength=n_rows * n_cols).reshape(n_rows, n_cols)
        tile_cnt = np.bincount(flat, minlength=n_rows * n_cols).reshape(n_rows, n_cols)
        cell_sum = _box_spread(tile_sum, c)
        cell_cnt = _box_spread(tile_cnt.astype(np.int64), c)
        out = np.full(cell_sum.shape, fill, dtype=np.float32)
        covered = cell_cnt > 0
        out[covered] = (cell_sum[covered] / cell_cnt[covered]).astype(np.float32)
        return out


def _head(values: np.ndarray, m: int) -> np.ndarray:
    """Indexes of the m best values, best first; ties in input order (stable)."""
    if m < values.size:
        part = np.argpartition(-values, m - 1)[:m]
        # argpartition may cut a tie group arbitrarily; take every member of the boundary score.
        part = np.flatnonzero(values >= values[part].min())
    else:
        part = np.arange(values.size)
    return part[np.argsort(-values[part], kind="stable")]


def _box_spread(tiles: np.ndarray, c: int) -> np.ndarray:
    """Sum each tile's value into cells [row, row+c) x [col, col+c): the shape grows by c-1 each way."""
    n_rows, n_cols = tiles.shape
    wide = np.zeros((n_rows, n_cols + c - 1), dtype=tiles.dtype)
    for dx in range(c):
        wide[:, dx:dx + n_cols] += tiles
    out = np.zeros((n_rows + c - 1, n_cols + c - 1), dtype=tiles.dtype)
    for dy in range(c):
        out[dy:dy + n_rows, :] += wide
    return out

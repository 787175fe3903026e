"""Read tiles for the model: block-friendly strips, each decoded once, never the whole raster.

Tiles overlap (stride < 1), so reading tile by tile would decode every raster block k² times
and reproject nothing useful. Instead the reader walks the grid's heatmap cells row by row:
one windowed read per cell row, resampled by GDAL straight to the model's resolution, kept in
a rolling buffer of k cell rows from which the k x k-cell tiles are sliced in memory. Memory
is bounded by k strips of the raster's width at model resolution, so a 40k x 40k VRT indexes
like a small GeoTIFF.

Strips stay band-sequential (3, rows, W), the layout GDAL returns, and tiles are views of them
(no transpose, no copy until the caller gathers a batch): on two cores the reader's CPU time is
taken straight from the model's, so it does as little as it can.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from model_backend.geo.raster import RasterInfo, dataset_mask
from model_backend.geo.tiling import TileGrid

# Masked pixels are filled with the ImageNet mean colour: zero after normalisation, so they
# contribute as little as possible to the embedding.
FILL_RGB = np.array([124, 116, 104], dtype=np.uint8)


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch to 8 bit; identity for 8-bit rasters.

    Computed once per raster (2nd-98th percentile of valid pixels on a decimated read) so
    every tile of a 16-bit raster is scaled the same way — per-tile stretching would make
    dark and bright areas look alike and wreck retrieval.
    """

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @property
    def is_identity(self) -> bool:
        return self.lo == (0.0, 0.0, 0.0) and self.hi == (255.0, 255.0, 255.0)

    def apply(self, bands: np.ndarray) -> np.ndarray:
        if self.is_identity and bands.dtype == np.uint8:
            return bands
        lo = np.asarray(self.lo, dtype=np.float32).reshape(3, 1, 1)
        hi = np.asarray(self.hi, dtype=np.float32).reshape(3, 1, 1)
        scaled = (bands.astype(np.float32) - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
        return np.clip(scaled, 0, 255).astype(np.uint8)

    def to_dict(self) -> dict:
        return {"lo": list(self.lo), "hi": list(self.hi)}


def compute_stretch(info: RasterInfo, max_side: int = 1024) -> Stretch:
    if info.dtype == "uint8":
        return Stretch((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    f = min(1.0, max_side / max(info.width, info.height))
    shape = (max(1, round(info.height * f)), max(1, round(info.width * f)))
    with rasterio.open(info.path) as ds:
        data = ds.read(list(info.rgb_bands), out_shape=(3, *shape), resampling=Resampling.nearest)
        mask = dataset_mask(ds, out_shape=shape, resampling=Resampling.nearest) > 0
    lo, hi = [], []
    for b in range(3):
        vals = data[b][mask] if mask.any() else data[b].ravel()
        p2, p98 = np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0)
        lo.append(float(p2))
        hi.append(float(max(p98, p2 + 1e-3)))
    return Stretch(tuple(lo), tuple(hi))  # type: ignore[arg-type]


class StripReader:
    """Yields the tiles of one grid row at a time, as model-ready uint8 RGB arrays (views of a strip)."""

    def __init__(self, info: RasterInfo, grid: TileGrid, input_size: int, stretch: Stretch) -> None:
        self.info = info
        self.grid = grid
        self.k = grid.cells_per_tile
        self.cell_px = max(1, round(input_size / self.k))
        self.tile_px = self.cell_px * self.k
        self.stretch = stretch
        self._ds = rasterio.open(info.path)
        # Cell strips cover the regular columns; the edge-aligned last column and row (tiling.TileGrid)
        # are read as windows of their own.
        full_cells = grid.full_cols - 1 + self.k
        self._col_px = min(round(full_cells * grid.step_x), info.width)
        self._out_w = full_cells * self.cell_px
        upsample = grid.step_x < self.cell_px or grid.step_y < self.cell_px
        self._resampling = Resampling.bilinear if upsample else Resampling.average
        self._direct = stretch.is_identity and info.dtype == "uint8"
        """8-bit data needs no stretch: GDAL writes the strip straight into its final buffer."""

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> StripReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_cell_row(self, j: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB (3, cell_px, W) uint8 and valid mask (cell_px, W) bool (None: all valid).

        `out`, if given, is the (3, cell_px, W) uint8 array to fill (it may be a slice of a larger
        buffer); masked pixels are set to FILL_RGB in place.
        """
        y0 = round(j * self.grid.step_y)
        y1 = min(round((j + 1) * self.grid.step_y), self.info.height)
        return self.read_window(Window(0, y0, self._col_px, max(1, y1 - y0)), (self.cell_px, self._out_w), out)

    def read_window(self, win: Window, shape: tuple[int, int], out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A window of the raster resampled to `shape`: RGB (3, *shape) uint8 and its valid mask (None: all valid)."""
        if out is None:
            out = np.empty((3, *shape), np.uint8)
        bands = list(self.info.rgb_bands)
        if self._direct:
            self._ds.read(bands, out=out, window=win, resampling=self._resampling)
            raw = out
        else:
            raw = self._ds.read(bands, window=win, out_shape=(3, *shape), resampling=self._resampling)
            out[...] = self.stretch.apply(raw)
        if self.info.has_mask:
            mask = dataset_mask(self._ds, window=win, out_shape=shape, resampling=Resampling.nearest) > 0
        else:
            # Many orthophotos carry an undeclared black collar (no nodata tag, no alpha): pixels
            # that are exactly 0 in every band are treated as outside coverage, not embedded.
            mask = raw.max(axis=0) > 0
        if mask.all():
            return out, None
        np.copyto(out, FILL_RGB.reshape(3, 1, 1), where=~mask)
        return out, mask

    def _edge_window(self, col: int | None, row: int) -> Window:
        """Source window of the edge-aligned row (`row` = full_rows) and/or column (`col` = full_cols)."""
        g = self.grid
        x0, y0, w, h = g.window(g.full_cols if col is None else col, row)
        y0 = min(round(y0), self.info.height - max(1, round(h)))
        if col is None:  # the edge row: every regular column, as the cell strips span them
            return Window(0, y0, self._col_px, max(1, round(h)))
        x0 = min(round(x0), self.info.width - max(1, round(w)))
        return Window(x0, y0, max(1, round(w)), max(1, round(h)))

    def _slice(self, band: np.ndarray, masks: list[np.ndarray | None], channels_first: bool
               ) -> tuple[np.ndarray, np.ndarray]:
        """The regular tiles of a band (3, tile_px, W) and their valid fractions."""
        n, cp = self.grid.full_cols, self.cell_px
        tiles = np.lib.stride_tricks.sliding_window_view(band, (3, self.tile_px, self.tile_px))
        tiles = tiles[0, 0, ::cp][:n]
        if not channels_first:
            tiles = tiles.transpose(0, 2, 3, 1)
        if all(m is None for m in masks):
            return tiles, np.ones(n, dtype=np.float32)
        rows = band.shape[1] // len(masks)
        mband = np.concatenate([np.ones((rows, band.shape[2]), bool) if m is None else m for m in masks])
        col_valid = mband.mean(axis=0, dtype=np.float32)
        csum = np.concatenate([[0.0], np.cumsum(col_valid)])
        starts = np.arange(n) * cp
        return tiles, ((csum[starts + self.tile_px] - csum[starts]) / self.tile_px).astype(np.float32)

    def _edge_tile(self, row: int, channels_first: bool) -> tuple[np.ndarray, np.ndarray]:
        """The edge-aligned last tile of a row, as a batch of one, and its valid fraction."""
        s = self.tile_px
        rgb, mask = self.read_window(self._edge_window(self.grid.full_cols, row), (s, s))
        tile = rgb[None] if channels_first else rgb.transpose(1, 2, 0)[None]
        tile.flags.writeable = False  # as the strip views: a consumer may keep it
        valid = 1.0 if mask is None else float(mask.mean())
        return tile, np.array([valid], np.float32)

    def iter_rows(self, start_row: int = 0, stop_row: int | None = None, channels_first: bool = False
                  ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """For each tile row, once or twice: (row, first column, tiles, valid fraction per tile).

        The regular columns come first (first column 0), then, where the grid has one, the
        edge-aligned last column (first column `full_cols`, one tile). tiles are (n, S, S, 3) uint8,
        or (n, 3, S, S) with `channels_first`: read-only views, never written again (a consumer
        may keep them).
        """
        stop = self.grid.n_rows if stop_row is None else min(stop_row, self.grid.n_rows)
        edge_col = self.grid.n_cols > self.grid.full_cols
        for r, tiles, valid in self._regular_rows(start_row, min(stop, self.grid.full_rows), channels_first):
            yield r, 0, tiles, valid
            if edge_col:
                yield (r, self.grid.full_cols, *self._edge_tile(r, channels_first))
        if stop > self.grid.full_rows:  # the edge-aligned last row
            r = self.grid.full_rows
            band, mask = self.read_window(self._edge_window(None, r), (self.tile_px, self._out_w))
            yield (r, 0, *self._slice(band, [mask], channels_first))
            if edge_col:
                yield (r, self.grid.full_cols, *self._edge_tile(r, channels_first))

    def _regular_rows(self, start_row: int, stop: int, channels_first: bool
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        k, cp = self.k, self.cell_px
        strips: dict[int, np.ndarray] = {}
        masks: dict[int, np.ndarray | None] = {}
        for r in range(start_row, stop):
            for j in [j for j in strips if j < r]:
                del strips[j], masks[j]
            if k == 1:  # the strip is the band: read it in place
                band = np.empty((3, cp, self._out_w), np.uint8)
                masks[r] = self.read_cell_row(r, band)[1]
                strips[r] = band
            else:
                # One buffer per band of k strips: the new strip is read straight into its place,
                # the k - 1 kept ones are copied (the same bytes np.concatenate would move).
                band = np.empty((3, k * cp, self._out_w), np.uint8)
                for i, j in enumerate(range(r, r + k)):
                    part = band[:, i * cp:(i + 1) * cp]
                    if j in strips:
                        part[...] = strips[j]
                    else:
                        masks[j] = self.read_cell_row(j, part)[1]
                    strips[j] = part
            yield (r, *self._slice(band, [masks[j] for j in range(r, r + k)], channels_first))

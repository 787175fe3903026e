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
        # Only the columns the grid covers are read; the remainder (< one step) is never tiled.
        self._col_px = round(grid.cell_cols * grid.step_x)
        self._out_w = grid.cell_cols * self.cell_px
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
        win = Window(0, y0, self._col_px, max(1, y1 - y0))
        shape = (self.cell_px, self._out_w)
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

    def iter_rows(self, start_row: int = 0, stop_row: int | None = None, channels_first: bool = False
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """For each tile row: (row, tiles, valid fraction per tile).

        tiles are (n_cols, S, S, 3) uint8, or (n_cols, 3, S, S) with `channels_first`: read-only
        views of one band of k strips, never written again (a consumer may keep them).
        """
        stop = self.grid.n_rows if stop_row is None else min(stop_row, self.grid.n_rows)
        k, cp, n = self.k, self.cell_px, self.grid.n_cols
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
            tiles = np.lib.stride_tricks.sliding_window_view(band, (3, self.tile_px, self.tile_px))
            tiles = tiles[0, 0, ::cp][:n]
            if not channels_first:
                tiles = tiles.transpose(0, 2, 3, 1)
            row_masks = [masks[j] for j in range(r, r + k)]
            if all(m is None for m in row_masks):
                valid = np.ones(n, dtype=np.float32)
            else:
                mband = np.concatenate([np.ones((cp, self._out_w), bool) if m is None else m for m in row_masks])
                col_valid = mband.mean(axis=0, dtype=np.float32)
                csum = np.concatenate([[0.0], np.cumsum(col_valid)])
                starts = np.arange(n) * cp
                valid = ((csum[starts + self.tile_px] - csum[starts]) / self.tile_px).astype(np.float32)
            yield r, tiles, valid

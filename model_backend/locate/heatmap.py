"""The similarity heatmap as a GeoTIFF: every tile's score spread over the cells it covers, averaged.

The grid steps by exactly 1/k of a tile, so each tile covers a whole k x k block of heatmap
cells and a cell's value is the plain mean of the tiles over it (`TileScores.heatmap`): no
interpolation, no padding, and the heatmap's origin is the raster's origin (a peer plugin shifted its output by the
padding it added). Cells no kept tile covers (under skipped nodata tiles, or unscored) are
nodata, never zero, so "no data" cannot be read as "poor match" and a mean never divides by
zero. The heatmap ends where the last whole tile ends, so a strip narrower than one step at
the raster's right and bottom edges lies outside it.

A kept tile may still reach over the raster's own nodata (an orthomosaic's ragged border): the
cells of such a tile that lie mostly on nodata are nodata too when the raster is given, so the
heatmap never paints colour over an area that has no imagery to match.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
import rasterio.io
from rasterio.crs import CRS as RioCRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window

from model_backend.core.atomic import atomic_path
from model_backend.geo.raster import dataset_mask
from model_backend.geo.tiling import TileGrid
from model_backend.locate.scores import TileScores

NODATA = -9999.0
"""Nodata of the written GeoTIFF: outside cosine similarity's [-1, 1] and safe in every GIS
(NaN as nodata still trips some tools' equality tests)."""

BAND_NAME = "match score"
"""Band description of the heatmap: QGIS shows it in the legend and the identify panel, where a
longer phrase is cut off (the full definition is in this module's docstring)."""

MIN_VALID_SHARE = 0.5
"""A cell keeps its score only if at least this share of its area is valid raster data."""

_TILE_ABOVE = 512
"""Write internal 256 x 256 blocks once a side exceeds this; smaller heatmaps stay striped."""


def valid_cells(raster_path: str, grid: TileGrid) -> np.ndarray:
    """Share of each heatmap cell that is valid data (see `_valid_cells`), read once per raster
    version and grid: every photo of a flight on one raster needs the same mask."""
    st = os.stat(raster_path)
    return _valid_cells(str(raster_path), st.st_mtime_ns, st.st_size, grid)


@lru_cache(maxsize=8)
def _valid_cells(raster_path: str, mtime_ns: int, size: int, grid: TileGrid) -> np.ndarray:
    """Share of each heatmap cell's area that is valid data in the raster, shape (cell_rows, cell_cols).

    The raster's dataset mask (nodata, alpha or mask band, whatever GDAL honours) is read once,
    averaged straight down to the heatmap's grid by GDAL, so a mosaic of any size costs one
    decimated read and never a full-resolution mask in memory. A raster without any mask is
    sampled for the undeclared black collar the tile reader also skips (`_non_black_share`).
    """
    shape = (grid.cell_rows, grid.cell_cols)
    with rasterio.open(raster_path) as ds:
        if (ds.width, ds.height) != (grid.raster_width, grid.raster_height):
            raise ValueError(f"{raster_path} is {ds.width} x {ds.height} pixels but the tile grid was laid over "
                             f"{grid.raster_width} x {grid.raster_height}: not the searched raster")
        # Float window sizes keep cells exactly on the grid. The edge-aligned last tiles are drawn in
        # cells that reach up to one cell past the raster: read boundless, the outside is invalid.
        window = Window(0, 0, grid.cell_cols * grid.step_x, grid.cell_rows * grid.step_y)
        boundless = window.width > ds.width + 1e-6 or window.height > ds.height + 1e-6
        if all(MaskFlags.all_valid in flags for flags in ds.mask_flag_enums):
            share = _non_black_share(ds, window, shape, boundless)
        else:
            mask = dataset_mask(ds, window=window, out_shape=shape, resampling=Resampling.average,
                                boundless=boundless)
            share = mask.astype(np.float32) / 255.0
    if boundless:  # a cell that is partly past the edge is judged by its part inside the raster
        inside = np.outer(_inside(grid.cell_rows, grid.step_y, grid.raster_height),
                          _inside(grid.cell_cols, grid.step_x, grid.raster_width))
        share = np.where(inside > 0, np.minimum(share / np.maximum(inside, 1e-6), 1.0), 0.0).astype(np.float32)
    share.flags.writeable = False  # shared by every caller through the cache
    return share


def _inside(cells: int, step: float, size: int) -> np.ndarray:
    """Share of each cell along one axis that lies inside the raster."""
    return np.clip((size - np.arange(cells) * step) / step, 0.0, 1.0).astype(np.float32)


SAMPLES_PER_CELL = 4
"""Samples per cell side when an undeclared black collar is measured (nearest-neighbour reads)."""


def _non_black_share(ds: rasterio.io.DatasetReader, window: Window, shape: tuple[int, int],
                     boundless: bool = False) -> np.ndarray:
    """Share of each cell that is not exactly black in every band: the undeclared collar the tile
    reader also treats as outside coverage (reader.StripReader), measured on a sample grid."""
    k = SAMPLES_PER_CELL
    while k > 1 and shape[0] * shape[1] * k * k > 16_000_000:  # a few tens of MB whatever the mosaic
        k -= 1
    bands = list(range(1, min(ds.count, 3) + 1))
    data = ds.read(bands, window=window, out_shape=(len(bands), shape[0] * k, shape[1] * k),
                   resampling=Resampling.nearest, boundless=boundless, fill_value=0)
    valid = data.max(axis=0) > 0
    return valid.reshape(shape[0], k, shape[1], k).mean(axis=(1, 3)).astype(np.float32)


def write_heatmap(path: str, scores: TileScores, raster_path: str | None = None) -> str:
    """Write the heatmap as a single-band Float32 GeoTIFF in the raster's CRS; return the path.

    The CRS goes in as the raster's WKT, never via an EPSG code (custom CRSs would be lost or
    silently swapped), and the transform is the grid's cell transform, which starts at the
    raster's origin. The file appears complete or not at all (temp file + rename), so a crash
    or a full disk never leaves QGIS a truncated layer under the final name. Returns the
    absolute path.

    With ``raster_path`` (the searched raster), cells less than half covered by its valid data
    are nodata: a tile kept for its valid part would otherwise colour the nodata beside it.
    """
    grid = scores.grid
    data = scores.heatmap(fill=NODATA)
    if raster_path is not None:
        data[valid_cells(raster_path, grid) < MIN_VALID_SHARE] = NODATA
    height, width = data.shape
    profile: dict = {
        "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "float32",
        "crs": RioCRS.from_wkt(grid.crs_wkt), "transform": grid.cell_transform, "nodata": NODATA,
        "compress": "deflate", "predictor": 3, "zlevel": 6,
    }
    if max(width, height) > _TILE_ABOVE:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    n_kept = int(scores.scored.sum())
    with atomic_path(path, sidecars=(".aux.xml",)) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data, 1)
        dst.set_band_description(1, BAND_NAME)
        dst.update_tags(cdikt_kind="similarity_heatmap", cells_per_tile=str(grid.cells_per_tile),
                        footprint_m=f"{grid.footprint_m:g}", tiles=str(n_kept))
    return str(Path(path).absolute())

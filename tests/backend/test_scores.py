"""TileScores: one value for a photo's scores, checked once and asked for its best, window, top and heatmap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pyproj import CRS, Geod, Transformer
from rasterio.crs import CRS as RioCRS

from model_backend.core.config import TilingConfig
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import TileGrid, make_grid
from model_backend.locate.candidates import select_candidates
from model_backend.locate.scores import TileScores

from .conftest import DATA, warp_to


def all_tiles(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(grid.n_cols), np.arange(grid.n_rows))
    return cols.ravel(), rows.ravel()


@pytest.fixture(scope="module")
def grids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TileGrid]:
    folder = tmp_path_factory.mktemp("scores")
    wgs84 = warp_to(DATA / "florida_neon_0.10m.tif", folder / "g.tif", RioCRS.from_epsg(4326))
    return {"netherlands_28992": make_grid(open_raster(DATA / "netherlands_aerial_0.25m_epsg28992.tif"),
                                           TilingConfig(footprint_m=20.0)),
            "wgs84": make_grid(open_raster(wgs84), TilingConfig(footprint_m=10.0))}


def test_arrays_are_checked_once_and_kept_together(grids):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    s = TileScores(grid, cols.astype(np.int32), rows.astype(np.int32), np.linspace(0, 1, cols.size))
    assert s.cols.dtype == np.int64 and len(s) == cols.size and s.best == 1.0
    with pytest.raises(ValueError, match="differ"):
        TileScores(grid, cols, rows[:-1], np.zeros(cols.size))
    with pytest.raises(ValueError, match="outside"):
        TileScores(grid, cols + 1, rows, np.zeros(cols.size))
    with pytest.raises(ValueError, match="integer"):
        TileScores(grid, cols.astype(float), rows, np.zeros(cols.size))
    with pytest.raises(ValueError, match="heading"):
        TileScores(grid, cols, rows, np.zeros(cols.size), heading=np.zeros(3, np.int16))
    assert TileScores(grid, cols, rows, np.full(cols.size, np.nan)).best == -math.inf
    assert TileScores(grid, cols[:0], rows[:0], np.zeros(0)).top(5, 0.1).size == 0


@pytest.mark.parametrize("name", ["netherlands_28992", "wgs84"])
def test_within_keeps_exactly_the_tiles_near_a_point(grids, name):
    grid = grids[name]
    cols, rows = all_tiles(grid)
    s = TileScores(grid, cols, rows, np.random.default_rng(0).random(cols.size))
    xs, ys = s.centres()
    centre = (float(np.median(xs)), float(np.median(ys)))
    radius = 1.6 * grid.footprint_m
    near = s.within(centre, radius)
    to_ll = Transformer.from_crs(CRS.from_wkt(grid.crs_wkt), CRS.from_epsg(4326), always_xy=True)
    lon, lat = to_ll.transform(xs, ys)
    lon0, lat0 = to_ll.transform(*centre)
    _, _, d = Geod(ellps="WGS84").inv(np.full(lon.size, lon0), np.full(lat.size, lat0), lon, lat)
    clear = np.abs(d - radius) > 0.01 * radius  # the local scale is exact to well under 1 % here
    assert np.array_equal(near.scored[clear], (d <= radius)[clear])
    assert 5 < near.scored.sum() < cols.size
    np.testing.assert_array_equal(near.values[near.scored], s.values[near.scored])
    assert s.scored.all()  # the original is unchanged


def test_top_is_what_the_candidates_are(grids):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    values = np.round(np.random.default_rng(4).random(cols.size), 2)
    s = TileScores(grid, cols, rows, values)
    top = s.top(6, 0.1)
    cands = select_candidates(s, 6, 0.1)
    assert [c.score for c in cands] == values[top].tolist() == sorted(values[top].tolist(), reverse=True)
    x, y = grid.centres(cols[top], rows[top])
    assert [(c.x, c.y) for c in cands] == list(zip(np.atleast_1d(x).tolist(), np.atleast_1d(y).tolist()))
    for i, p in enumerate(top):  # distinct places: no kept tile overlaps a better one by more than the IoU
        assert (s.iou(int(cols[p]), int(rows[p]), cols[top[:i]], rows[top[:i]]) <= 0.1).all()


def test_heatmap_ignores_unscored_tiles(grids):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    values = np.full(cols.size, 0.5)
    values[(cols == 0) & (rows == 0)] = np.nan
    heat = TileScores(grid, cols, rows, values).heatmap()
    assert heat.shape == (grid.cell_rows, grid.cell_cols)
    assert np.isnan(heat[0, 0]) and (heat[np.isfinite(heat)] == 0.5).all()
    assert np.isfinite(heat).sum() == heat.size - 1  # only the corner cell lies under no other tile

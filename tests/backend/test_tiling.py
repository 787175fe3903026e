"""Tiling in ground metres across projected, geographic and custom CRSs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pyproj import CRS
from rasterio.crs import CRS as RioCRS

from model_backend.core.config import TilingConfig
from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import EDGE_MIN_STEP, make_grid

from .conftest import CUSTOM_WKT, warp_to


def test_projected_utm_grid_is_metric(data_dir: Path) -> None:
    info = open_raster(data_dir / "florida_neon_0.10m.tif")  # UTM, 0.1 m
    assert info.gsd_x_m == pytest.approx(0.1, rel=2e-3)
    grid = make_grid(info, TilingConfig(footprint_m=10, stride=0.5))
    assert grid.tile_w == pytest.approx(100, rel=2e-3)
    # 400 px wide, 100 px tiles, 50 px steps -> 7 x 7 tiles, heatmap cells 8 x 8
    assert (grid.n_cols, grid.n_rows) == (7, 7)
    assert (grid.cell_cols, grid.cell_rows) == (8, 8)


def test_mercator_metres_are_ground_metres(data_dir: Path) -> None:
    # EPSG:3395 at Manila (14.6 N): 0.1 map metres are ~0.0968 ground metres.
    info = open_raster(data_dir / "manila_oam_0.10m.tif")
    lat = 14.6
    assert info.gsd_x_m == pytest.approx(0.1001 * math.cos(math.radians(lat)), rel=0.01)


def test_geographic_raster_converts_degrees_at_its_latitude(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "colorado_hro_0.15m_nodata.tif"
    geo = warp_to(src, tmp_path / "geo.tif", RioCRS.from_epsg(4326))
    utm, ll = open_raster(src), open_raster(geo)
    assert CRS.from_wkt(ll.crs_wkt).is_geographic
    # The same ground, so the same ground size in metres (within warping tolerance).
    assert ll.width_m == pytest.approx(utm.width_m, rel=0.03)
    assert ll.height_m == pytest.approx(utm.height_m, rel=0.03)
    grid = make_grid(ll, TilingConfig(footprint_m=15))
    assert grid.tile_w * ll.gsd_x_m == pytest.approx(15)
    assert grid.tile_h * ll.gsd_y_m == pytest.approx(15)
    assert grid.tile_w != pytest.approx(grid.tile_h, rel=0.05)  # degrees: non-square pixels


def test_custom_wkt_without_authority(data_dir: Path, tmp_path: Path) -> None:
    custom = warp_to(data_dir / "netherlands_aerial_0.25m_epsg28992.tif", tmp_path / "c.tif",
                     RioCRS.from_wkt(CUSTOM_WKT))
    info = open_raster(custom)
    assert CRS.from_wkt(info.crs_wkt).to_epsg() is None
    assert info.gsd_x_m == pytest.approx(0.25, rel=0.02)
    grid = make_grid(info, TilingConfig(footprint_m=50))
    ring = grid.polygon(0, 0)
    assert ring[0] == ring[-1] and len(ring) == 5


def test_polygons_are_counter_clockwise_and_centres_inside(data_dir: Path) -> None:
    info = open_raster(data_dir / "netherlands_aerial_0.25m_epsg28992.tif")
    grid = make_grid(info, TilingConfig(footprint_m=50))
    ring = grid.polygon(2, 3)
    area = 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
    assert area == pytest.approx(50 * 50, rel=0.01)
    cx, cy = grid.centres([2], [3])
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert min(xs) < cx[0] < max(xs) and min(ys) < cy[0] < max(ys)


@pytest.mark.parametrize("stride", [0, 1.5, 0.4])
def test_bad_stride_is_refused(data_dir: Path, stride: float) -> None:
    info = open_raster(data_dir / "florida_neon_0.10m.tif")
    with pytest.raises(InputError, match="Stride"):
        make_grid(info, TilingConfig(footprint_m=10, stride=stride))


def test_absurd_tile_count_is_refused_with_advice(data_dir: Path) -> None:
    info = open_raster(data_dir / "manila_oam_0.10m.tif")
    with pytest.raises(InputError, match=r"tiles would be needed.*footprint of at least"):
        make_grid(info, TilingConfig(footprint_m=1.0, max_tiles=1000))


def test_footprint_larger_than_raster_is_refused(data_dir: Path) -> None:
    info = open_raster(data_dir / "florida_neon_0.10m.tif")  # 40 m wide
    with pytest.raises(InputError, match="larger than the raster"):
        make_grid(info, TilingConfig(footprint_m=100))


@pytest.mark.parametrize("footprint", [40.0, 55.0, 60.0, 125.0])
def test_the_grid_reaches_the_right_and_bottom_edges(data_dir: Path, footprint: float) -> None:
    """Regular steps from the origin, then one column and row aligned to the far edges where the steps
    stop short: every pixel is in some tile, and no tile leaves the raster."""
    info = open_raster(data_dir / "netherlands_aerial_0.25m_epsg28992.tif")
    grid = make_grid(info, TilingConfig(footprint_m=footprint))
    x0, y0, w, h = grid.window(grid.n_cols - 1, grid.n_rows - 1)
    assert info.width - EDGE_MIN_STEP * grid.step_x <= x0 + w <= info.width + 1e-6  # at most a sliver left
    assert info.height - EDGE_MIN_STEP * grid.step_y <= y0 + h <= info.height + 1e-6
    assert grid.n_cols - grid.full_cols in (0, 1) and grid.n_rows - grid.full_rows in (0, 1)
    for c in range(grid.full_cols):  # the regular columns are where they always were
        assert grid.window(c, 0)[0] == pytest.approx(c * grid.step_x)
    if grid.n_cols > grid.full_cols:  # the edge column overlaps the last regular one by more than a step
        gap = grid.window(grid.n_cols - 1, 0)[0] - grid.window(grid.full_cols - 1, 0)[0]
        assert 0 < gap < grid.step_x
    cx, cy = grid.centres(np.array([grid.n_cols - 1]), np.array([grid.n_rows - 1]))
    assert (cx[0], cy[0]) == pytest.approx(info.affine * (x0 + w / 2, y0 + h / 2))

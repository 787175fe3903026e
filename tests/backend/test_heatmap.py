"""Heatmap: right CRS, no shift, scores land on the right cells, nodata where nothing was scored."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import CRS
from rasterio.crs import CRS as RioCRS

from model_backend.core.config import TilingConfig
from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import TileGrid, make_grid
from model_backend.locate.heatmap import BAND_NAME, NODATA, write_heatmap
from model_backend.locate.scores import TileScores

from .conftest import DATA, warp_to

CUSTOM_LCC = (
    'PROJCS["Custom LCC",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Lambert_Conformal_Conic_2SP"],'
    'PARAMETER["standard_parallel_1",10],PARAMETER["standard_parallel_2",20],PARAMETER["latitude_of_origin",14],'
    'PARAMETER["central_meridian",121],PARAMETER["false_easting",500000],PARAMETER["false_northing",200000],'
    'UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)


def make_custom_raster(folder: Path) -> Path:
    """A real raster re-labelled with a custom LCC CRS that has no EPSG code."""
    with rasterio.open(DATA / "netherlands_aerial_0.25m_epsg28992.tif") as src:
        profile, pixels = src.profile, src.read()
    profile.update(crs=RioCRS.from_wkt(CUSTOM_LCC),
                   transform=rasterio.Affine(0.25, 0, 500100.5, 0, -0.25, 200300.25))
    out = folder / "custom_lcc.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(pixels)
    return out




@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float]]:
    """name -> (raster, footprint in metres giving a grid of a few dozen tiles)."""
    folder = tmp_path_factory.mktemp("rasters")
    return {
        "manila_3395": (DATA / "manila_oam_0.10m.tif", 20.0),
        "netherlands_28992": (DATA / "netherlands_aerial_0.25m_epsg28992.tif", 20.0),
        "custom_lcc": (make_custom_raster(folder), 20.0),
        "wgs84": (warp_to(DATA / "florida_neon_0.10m.tif", folder / "g.tif", RioCRS.from_epsg(4326)), 10.0),
    }


def heatmap_of(grid: TileGrid, cols, rows, scores) -> np.ndarray:
    return TileScores(grid, cols, rows, scores).heatmap()


def all_tiles(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(grid.n_cols), np.arange(grid.n_rows))
    return cols.ravel().astype(np.int32), rows.ravel().astype(np.int32)


def brute_force(grid: TileGrid, cols, rows, scores) -> np.ndarray:
    """The definition, cell by cell: mean score of the finite-scored tiles covering each cell."""
    k = grid.cells_per_tile
    acc: dict[tuple[int, int], list[float]] = {}
    for c, r, s in zip(cols, rows, scores):
        if np.isfinite(s):
            for i in range(r, r + k):
                for j in range(c, c + k):
                    acc.setdefault((i, j), []).append(float(s))
    out = np.full((grid.cell_rows, grid.cell_cols), np.nan)
    for (i, j), vals in acc.items():
        out[i, j] = np.mean(vals)
    return out


@pytest.mark.parametrize("name", ["manila_3395", "netherlands_28992", "custom_lcc", "wgs84"])
def test_heatmap_georeferencing_and_peak(rasters, name, tmp_path):
    path, footprint = rasters[name]
    info = open_raster(path)
    grid = make_grid(info, TilingConfig(footprint_m=footprint, stride=0.5))
    assert grid.n_cols >= 5 and grid.n_rows >= 5
    cols, rows = all_tiles(grid)
    scores = np.zeros(cols.size)
    pc, pr = grid.n_cols // 2, grid.n_rows // 2
    peak = np.flatnonzero((cols == pc) & (rows == pr))[0]
    scores[peak] = 1.0
    out = write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, scores))
    assert os.listdir(tmp_path) == ["h.tif"]  # no temp file or sidecar left behind

    with rasterio.open(out) as ds:
        assert CRS.from_wkt(ds.crs.to_wkt()) == CRS.from_wkt(info.crs_wkt)
        assert ds.transform == grid.cell_transform
        assert (ds.transform.c, ds.transform.f) == (info.transform[2], info.transform[5])  # no shift
        assert (ds.width, ds.height) == (grid.cell_cols, grid.cell_rows)
        assert ds.count == 1 and ds.dtypes[0] == "float32" and ds.nodata == NODATA
        assert ds.compression.name.lower() == "deflate"
        data = ds.read(1)
        x, y = grid.centres(np.array([pc]), np.array([pr]))
        i, j = ds.index(float(x[0]), float(y[0]))
        at_centre = data[i, j]
    k = grid.cells_per_tile
    hottest = {tuple(p) for p in np.argwhere(data == data.max())}
    assert hottest == {(r, c) for r in range(pr, pr + k) for c in range(pc, pc + k)}
    assert at_centre == data.max() == pytest.approx(1.0 / k**2)


def test_peak_stands_out_over_noisy_background(rasters, tmp_path):
    info = open_raster(rasters["manila_3395"][0])
    grid = make_grid(info, TilingConfig(footprint_m=20.0, stride=0.5))
    cols, rows = all_tiles(grid)
    scores = np.random.default_rng(3).uniform(0.0, 0.2, cols.size)
    pc, pr = 3, grid.n_rows - 4
    scores[(cols == pc) & (rows == pr)] = 1.0
    with rasterio.open(write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, scores))) as ds:
        data = ds.read(1)
        x, y = grid.centres(np.array([pc]), np.array([pr]))
        i, j = ds.index(float(x[0]), float(y[0]))
    above = {tuple(p) for p in np.argwhere(data > 0.2)}
    assert above == {(r, c) for r in range(pr, pr + 2) for c in range(pc, pc + 2)}
    assert data[i, j] > 0.25 - 1e-6


def test_nodata_outside_coverage(rasters, tmp_path):
    info = open_raster(rasters["netherlands_28992"][0])
    grid = make_grid(info, TilingConfig(footprint_m=20.0, stride=0.5))
    cols, rows = all_tiles(grid)
    keep = (cols >= 2) & ~((rows == 5) & (cols == 7))  # a skipped band on the left, one hole inside
    scores = np.full(cols.size, 0.5)
    scores[(rows == 9) & (cols == 9)] = np.nan  # an unscorable tile counts as skipped
    out = write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols[keep], rows[keep], scores[keep]))
    with rasterio.open(out) as ds:
        band = ds.read(1, masked=True)
    expected = np.isnan(brute_force(grid, cols[keep], rows[keep], scores[keep]))
    assert expected[:, :2].all() and not expected[:, 2:].all()
    np.testing.assert_array_equal(band.mask, expected)
    assert np.all(band.compressed() == np.float32(0.5))  # a mean of equal scores is that score, exactly


def test_overlap_average_by_hand_on_3x3_grid(rasters):
    info = open_raster(rasters["netherlands_28992"][0])
    grid = make_grid(info, TilingConfig(footprint_m=125.0, stride=0.5))  # 250 m: steps end at the edges
    assert (grid.n_cols, grid.n_rows, grid.cells_per_tile) == (3, 3, 2)
    cols, rows = all_tiles(grid)
    scores = (3 * rows + cols + 1).astype(float)  # tiles 1..9, row by row
    expected = np.array([
        [1.0, 1.5, 2.5, 3.0],
        [2.5, 3.0, 4.0, 4.5],   # (1+2+4+5)/4, (2+3+5+6)/4, (3+6)/2
        [5.5, 6.0, 7.0, 7.5],
        [7.0, 7.5, 8.5, 9.0],
    ])
    np.testing.assert_array_equal(heatmap_of(grid, cols, rows, scores), expected)

    # Only the diagonal kept: cells under two diagonal tiles average them, cells under none are nodata.
    n = np.nan
    diag = heatmap_of(grid, np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([1.0, 5.0, 9.0]))
    np.testing.assert_array_equal(diag, np.array([
        [1.0, 1.0, n, n],
        [1.0, 3.0, 5.0, n],
        [n, 5.0, 7.0, 9.0],
        [n, n, 9.0, 9.0],
    ]))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_brute_force_for_any_overlap(k):
    rng = np.random.default_rng(k)
    grid = TileGrid(crs_wkt=CRS.from_epsg(32633).to_wkt(), transform=(0.5, 0, 4e5, 0, -0.5, 5e6),
                    raster_width=400, raster_height=300, tile_w=60.0, tile_h=60.0, step_x=60.0 / k,
                    step_y=60.0 / k, cells_per_tile=k, n_cols=9, n_rows=7, footprint_m=30.0)
    cols, rows = all_tiles(grid)
    keep = rng.random(cols.size) < 0.7
    scores = rng.uniform(-1, 1, cols.size)
    scores[rng.random(cols.size) < 0.05] = np.nan
    got = heatmap_of(grid, cols[keep], rows[keep], scores[keep])
    assert got.shape == (grid.cell_rows, grid.cell_cols) and got.dtype == np.float32
    want = brute_force(grid, cols[keep], rows[keep], scores[keep])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bad_indexes_are_refused(rasters):
    grid = make_grid(open_raster(rasters["netherlands_28992"][0]), TilingConfig(footprint_m=110.0))
    with pytest.raises(ValueError, match="outside"):
        heatmap_of(grid, np.array([grid.n_cols]), np.array([0]), np.array([1.0]))
    with pytest.raises(ValueError, match="differ"):
        heatmap_of(grid, np.array([0, 1]), np.array([0]), np.array([1.0]))
    with pytest.raises(ValueError, match="integer"):
        heatmap_of(grid, np.array([0.5]), np.array([0.0]), np.array([1.0]))
    assert np.isnan(heatmap_of(grid, np.array([], int), np.array([], int), np.array([]))).all()


def test_large_heatmap_is_tiled_and_empty_one_is_all_nodata(tmp_path):
    grid = TileGrid(crs_wkt=CUSTOM_LCC, transform=(0.1, 0, 5e5, 0, -0.1, 2e5), raster_width=70000,
                    raster_height=7000, tile_w=200.0, tile_h=200.0, step_x=100.0, step_y=100.0,
                    cells_per_tile=2, n_cols=699, n_rows=69, footprint_m=20.0)
    cols, rows = all_tiles(grid)
    out = write_heatmap(str(tmp_path / "big.tif"), TileScores(grid, cols, rows, np.linspace(-1, 1, cols.size)))
    with rasterio.open(out) as ds:
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert CRS.from_wkt(ds.crs.to_wkt()) == CRS.from_wkt(CUSTOM_LCC)
    none = np.array([], dtype=int)
    empty = write_heatmap(str(tmp_path / "empty.tif"), TileScores(grid, none, none, np.array([])))
    with rasterio.open(empty) as ds:
        assert ds.read(1, masked=True).mask.all()


def test_atomic_write_failures_leave_nothing(rasters, tmp_path, monkeypatch):
    grid = make_grid(open_raster(rasters["netherlands_28992"][0]), TilingConfig(footprint_m=110.0))
    cols, rows = all_tiles(grid)
    scores = np.arange(cols.size, dtype=float)

    with pytest.raises(InputError, match="does not exist"):
        write_heatmap(str(tmp_path / "missing" / "h.tif"), TileScores(grid, cols, rows, scores))
    assert os.listdir(tmp_path) == []

    target = tmp_path / "h.tif"
    write_heatmap(str(target), TileScores(grid, cols, rows, scores))
    before = target.read_bytes()
    (tmp_path / "h.tif.aux.xml").write_text("<PAMDataset>stale statistics</PAMDataset>")

    def fail_midway(self, *args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_heatmap(str(target), TileScores(grid, cols, rows, scores * 2))
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old heatmap survives a failed rewrite intact
    assert sorted(os.listdir(tmp_path)) == ["h.tif", "h.tif.aux.xml"]

    write_heatmap(str(target), TileScores(grid, cols, rows, scores * 2))
    assert os.listdir(tmp_path) == ["h.tif"]  # stale sidecar of the old file removed
    with rasterio.open(target) as ds:
        assert ds.read(1).max() == pytest.approx(2 * scores.max())


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_a_clear_error(rasters, tmp_path):
    grid = make_grid(open_raster(rasters["netherlands_28992"][0]), TilingConfig(footprint_m=110.0))
    cols, rows = all_tiles(grid)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="Cannot write"):
            write_heatmap(str(folder / "h.tif"), TileScores(grid, cols, rows, np.ones(cols.size)))
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def _valid_share_by_pixel_centres(raster: Path, grid: TileGrid) -> np.ndarray:
    """Share of valid pixels per heatmap cell at full resolution (pixel centre decides the cell)."""
    with rasterio.open(raster) as ds:
        valid = ds.dataset_mask() > 0
    cell_y = ((np.arange(valid.shape[0]) + 0.5) / grid.step_y).astype(int)
    cell_x = ((np.arange(valid.shape[1]) + 0.5) / grid.step_x).astype(int)
    yy, xx = np.meshgrid(cell_y, cell_x, indexing="ij")
    inside = (yy < grid.cell_rows) & (xx < grid.cell_cols)
    hits = np.zeros((grid.cell_rows, grid.cell_cols))
    count = np.zeros_like(hits)
    np.add.at(hits, (yy[inside], xx[inside]), valid[inside])
    np.add.at(count, (yy[inside], xx[inside]), 1)
    return hits / count


def test_cells_over_the_rasters_nodata_are_nodata(tmp_path):
    """A Pix4D mosaic's transparent border: tiles reaching over it must not paint it."""
    raster = DATA / "bali_pix4d_0.35m_alpha.tif"
    grid = make_grid(open_raster(raster), TilingConfig(footprint_m=10.0, stride=0.5))
    cols, rows = all_tiles(grid)
    scores = np.full(cols.size, 0.5)

    with rasterio.open(write_heatmap(str(tmp_path / "plain.tif"), TileScores(grid, cols, rows, scores))) as ds:
        assert not ds.read(1, masked=True).mask.any()  # without the raster every scored cell is painted
    out = write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, scores), raster_path=str(raster))
    assert sorted(os.listdir(tmp_path)) == ["h.tif", "plain.tif"]
    with rasterio.open(out) as ds:
        data = ds.read(1)
        assert ds.nodata == NODATA and ds.transform == grid.cell_transform

    share = _valid_share_by_pixel_centres(raster, grid)
    mostly_nodata, mostly_valid = share < 0.45, share > 0.55  # GDAL also weighs partial pixels
    assert mostly_nodata.sum() > 50 and mostly_valid.sum() > 1000
    assert np.all(data[mostly_nodata] == NODATA)
    assert np.all(data[mostly_valid] == np.float32(0.5))
    assert data[0, 0] == NODATA and data[grid.cell_rows // 2, grid.cell_cols // 2] == np.float32(0.5)


def test_a_raster_without_nodata_masks_nothing_and_a_wrong_raster_is_refused(rasters, tmp_path):
    raster = rasters["netherlands_28992"][0]
    grid = make_grid(open_raster(raster), TilingConfig(footprint_m=20.0, stride=0.5))
    cols, rows = all_tiles(grid)
    out = write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, np.full(cols.size, 0.25)),
                        raster_path=str(raster))
    with rasterio.open(out) as ds:
        assert np.all(ds.read(1) == np.float32(0.25))
    with pytest.raises(ValueError, match="not the searched raster"):
        write_heatmap(str(tmp_path / "w.tif"), TileScores(grid, cols, rows, np.ones(cols.size)),
                      raster_path=str(DATA / "bali_pix4d_0.35m_alpha.tif"))


def test_band_has_a_short_meaningful_name(rasters, tmp_path):
    """QGIS puts the band description in the legend, where a long one is cut off."""
    grid = make_grid(open_raster(rasters["netherlands_28992"][0]), TilingConfig(footprint_m=110.0))
    cols, rows = all_tiles(grid)
    with rasterio.open(write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, np.ones(cols.size)))) as ds:
        assert ds.descriptions == (BAND_NAME,) == ("match score",)


def test_cells_over_an_undeclared_black_collar_are_nodata(tmp_path):
    """The Manila orthophoto has black corners and no nodata tag: the tile reader skips them, and
    so must the heatmap, or it paints colour over the collar."""
    raster = DATA / "manila_oam_0.10m.tif"
    grid = make_grid(open_raster(raster), TilingConfig(footprint_m=20.0, stride=0.5))
    cols, rows = all_tiles(grid)
    out = write_heatmap(str(tmp_path / "h.tif"), TileScores(grid, cols, rows, np.full(cols.size, 0.5)),
                        raster_path=str(raster))
    from rasterio.windows import Window

    with rasterio.open(raster) as src:  # black share per cell, counted on a finer grid than the engine's
        win = Window(0, 0, grid.cell_cols * grid.step_x, grid.cell_rows * grid.step_y)
        black = src.read(window=win, out_shape=(3, grid.cell_rows * 8, grid.cell_cols * 8)).max(axis=0) == 0
    share_black = black.reshape(grid.cell_rows, 8, grid.cell_cols, 8).mean(axis=(1, 3))
    with rasterio.open(out) as ds:
        heat = ds.read(1)
    assert (share_black > 0.8).sum() > 10  # the collar is there
    assert np.all(heat[share_black > 0.8] == NODATA)
    assert np.all(heat[share_black < 0.2] == np.float32(0.5))

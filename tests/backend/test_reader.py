"""Reading tiles: masks, band layouts, bit depths, and each strip decoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from model_backend.core.config import TilingConfig
from model_backend.geo.raster import open_raster
from model_backend.geo.reader import StripReader, compute_stretch
from model_backend.geo.tiling import make_grid


def _all_tiles(path: Path, footprint: float, size: int = 64):
    info = open_raster(path)
    grid = make_grid(info, TilingConfig(footprint_m=footprint))
    with StripReader(info, grid, size, compute_stretch(info)) as rd:
        rows = list(rd.iter_rows())
    tiles = np.concatenate([t for _, _, t, _ in rows])
    valid = np.concatenate([v for _, _, _, v in rows])
    return info, grid, tiles, valid


def test_alpha_mask_gives_fractional_validity(data_dir: Path) -> None:
    info, grid, tiles, valid = _all_tiles(data_dir / "bali_pix4d_0.35m_alpha.tif", 40)
    assert info.has_mask and info.rgb_bands == (1, 2, 3)
    assert tiles.shape == (grid.n_tiles, 64, 64, 3)
    assert valid.min() < 0.5 < valid.max() == pytest.approx(1.0)
    assert (valid < 0.5).sum() >= 2  # the irregular drone-ortho border really is skipped


def test_nodata_value_is_honoured(data_dir: Path) -> None:
    info, _, _, valid = _all_tiles(data_dir / "colorado_hro_0.15m_nodata.tif", 10)
    assert info.has_mask
    assert valid.min() < 1.0


def test_uint16_panchromatic_is_stretched_to_grey(data_dir: Path) -> None:
    info, _, tiles, _ = _all_tiles(data_dir / "atlanta_spacenet_pan_0.5m_uint16.tif", 100)
    assert info.dtype == "uint16" and info.rgb_bands == (1, 1, 1)
    stretch = compute_stretch(info)
    assert not stretch.is_identity and stretch.hi[0] > 255  # real 11-bit data
    assert np.array_equal(tiles[..., 0], tiles[..., 1])
    assert tiles.std() > 20  # full 8-bit range used, not a black image


def test_rgbn_uses_first_three_bands(data_dir: Path) -> None:
    info, _, tiles, _ = _all_tiles(data_dir / "naip_northdakota_5m_2015.tif", 500)
    assert info.count == 4 and info.rgb_bands == (1, 2, 3)
    assert tiles.dtype == np.uint8 and tiles.std() > 5


def test_tiles_match_a_direct_windowed_read(data_dir: Path) -> None:
    """No shift: the sliced tile is the same ground as a direct read of its window."""
    path = data_dir / "netherlands_aerial_0.25m_epsg28992.tif"
    info, grid, tiles, _ = _all_tiles(path, 50, size=128)
    c, r = 2, 3
    x0, y0, w, h = grid.window(c, r)
    with rasterio.open(path) as ds:
        ref = ds.read([1, 2, 3], window=Window(x0, y0, w, h), out_shape=(3, 128, 128),
                      resampling=Resampling.average).transpose(1, 2, 0).astype(float)
    got = tiles[r * grid.n_cols + c].astype(float)
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > 0.97


def test_each_cell_row_is_read_once_with_bounded_windows(data_dir: Path, tmp_path: Path) -> None:
    """A 2 x 2 VRT mosaic: reads are strips of the grid, never the whole raster, never repeated."""
    src = data_dir / "netherlands_aerial_0.25m_epsg28992.tif"
    with rasterio.open(src) as ds:
        w, h = ds.width, ds.height
    vrt = tmp_path / "mosaic.vrt"
    _mosaic_vrt(src, vrt, w, h)
    info = open_raster(vrt)
    assert (info.width, info.height) == (2 * w, 2 * h)
    grid = make_grid(info, TilingConfig(footprint_m=60))
    reads: list[int] = []
    with StripReader(info, grid, 64, compute_stretch(info)) as rd:
        real = rd.read_cell_row

        def counting(j: int, out: np.ndarray | None = None):
            reads.append(j)
            return real(j, out)

        rd.read_cell_row = counting  # type: ignore[method-assign]
        n = sum(len(t) for _, _, t, _ in rd.iter_rows())
    assert n == grid.n_tiles
    assert sorted(reads) == list(range(grid.full_rows - 1 + grid.cells_per_tile))  # every strip once
    assert grid.step_y < info.height / 8  # so a strip is a small slice of the mosaic


def _mosaic_vrt(src: Path, out: Path, w: int, h: int) -> None:
    with rasterio.open(src) as ds:
        t = ds.transform
        crs = ds.crs.to_wkt()
    bands = []
    for b in (1, 2, 3):
        srcs = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT='0'>{src}</SourceFilename><SourceBand>{b}</SourceBand>"
            f"<SrcRect xOff='0' yOff='0' xSize='{w}' ySize='{h}'/>"
            f"<DstRect xOff='{dx * w}' yOff='{dy * h}' xSize='{w}' ySize='{h}'/></SimpleSource>"
            for dx in (0, 1) for dy in (0, 1))
        bands.append(f"<VRTRasterBand dataType='Byte' band='{b}'>{srcs}</VRTRasterBand>")
    gt = f"{t.c}, {t.a}, 0, {t.f}, 0, {t.e}"
    out.write_text(f"<VRTDataset rasterXSize='{2 * w}' rasterYSize='{2 * h}'><SRS>{crs}</SRS>"
                   f"<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")


def test_channels_first_tiles_and_uint8_batches_are_the_same_pixels(data_dir: Path) -> None:
    """Band-sequential tiles (what indexing gathers) are the HWC tiles transposed; batches keep only valid tiles."""
    from model_backend.index.build import tile_batches

    path = data_dir / "bali_pix4d_0.35m_alpha.tif"  # alpha mask: some tiles dropped, filled pixels inside others
    info, grid, hwc, valid = _all_tiles(path, 40)
    with StripReader(info, grid, 64, compute_stretch(info)) as rd:
        rows = list(rd.iter_rows(channels_first=True))
        assert all(not t.flags.writeable for _, _, t, _ in rows)  # views of a strip, never written again
        chw = np.concatenate([t for _, _, t, _ in rows])
        assert chw.shape == (grid.n_tiles, 3, 64, 64)
        np.testing.assert_array_equal(chw, hwc.transpose(0, 3, 1, 2))
        batches = list(tile_batches(rd, None, 0, grid.n_rows, 7, 0.5, raw=True))  # type: ignore[arg-type]
    assert all(b.dtype == np.uint8 and b.shape[1:] == (3, 64, 64) and len(b) <= 7 for _, _, b in batches)
    cols = np.concatenate([c for c, _, _ in batches])
    rws = np.concatenate([r for _, r, _ in batches])
    kept = np.nonzero(valid >= 0.5)[0]
    np.testing.assert_array_equal(rws * grid.n_cols + cols, kept)
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in batches]), chw[kept])


def test_the_edge_column_and_row_are_the_ground_of_their_windows(data_dir: Path) -> None:
    """The edge-aligned last column and row are read as windows of their own: the same ground as a
    direct read of the tile's window, in row-major order after the regular tiles of each row."""
    path = data_dir / "netherlands_aerial_0.25m_epsg28992.tif"
    info, grid, tiles, _ = _all_tiles(path, 60, size=128)
    assert grid.n_cols == grid.full_cols + 1 and grid.n_rows == grid.full_rows + 1
    assert tiles.shape[0] == grid.n_tiles
    for c, r in ((grid.n_cols - 1, 2), (3, grid.n_rows - 1), (grid.n_cols - 1, grid.n_rows - 1)):
        x0, y0, w, h = grid.window(c, r)
        with rasterio.open(path) as ds:
            ref = ds.read([1, 2, 3], window=Window(x0, y0, w, h), out_shape=(3, 128, 128),
                          resampling=Resampling.average).transpose(1, 2, 0).astype(float)
        got = tiles[r * grid.n_cols + c].astype(float)
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.97, (c, r)

"""Synthetic drone views: geometry against the raster itself, masks, bit depths, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image, ImageDraw
from rasterio.windows import Window

from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets.synth import ViewSpec, make_views, random_spec, render_view, save_view

NL = "netherlands_aerial_0.25m_epsg28992.tif"   # RD New: map metres are ground metres to ~1e-4


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).mean(axis=-1).ravel()
    b = np.asarray(b, np.float64).mean(axis=-1).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _area(poly: list[tuple[float, float]]) -> float:
    ring = poly + poly[:1]
    return abs(0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])))


def _centre_spec(path: Path, footprint_m: float, col: float = 500, row: float = 500, **kw) -> ViewSpec:
    info = open_raster(path)
    cx, cy = info.affine * (col, row)
    return ViewSpec(cx, cy, footprint_m, **kw)


def test_nadir_view_is_the_raster_crop(data_dir: Path) -> None:
    # 480 px for 120 m at 0.25 m/px: output pixels are raster pixels, so the view is a plain crop.
    path = data_dir / NL
    view = render_view(str(path), _centre_spec(path, 120.0))
    assert view.image.shape == (480, 640, 3) and view.image.dtype == np.uint8
    with rasterio.open(path) as ds:
        crop = ds.read(window=Window(500 - 320, 500 - 240, 640, 480)).transpose(1, 2, 0)
    assert _corr(view.image, crop) > 0.97
    assert np.abs(view.image.astype(int) - crop).mean() < 8
    info = open_raster(path)
    expected = [info.affine * c for c in [(180, 260), (820, 260), (820, 740), (180, 740)]]
    assert np.allclose(view.truth_polygon, expected, atol=0.2)
    assert view.valid_fraction == 1.0
    centre = view.image_to_crs @ np.array([320.0, 240.0, 1.0])
    assert np.allclose(centre[:2] / centre[2], (view.spec.cx, view.spec.cy), atol=1e-6)


def test_heading_rotates_the_image_top_towards_it(data_dir: Path) -> None:
    path = data_dir / NL
    north = render_view(str(path), _centre_spec(path, 80.0))
    east = render_view(str(path), _centre_spec(path, 80.0, heading_deg=90.0))
    # Heading 90: east is up, so the nadir image turned a quarter counter-clockwise matches.
    turned = np.rot90(north.image, 1)[80:560]
    assert _corr(turned, east.image[:, 80:560]) > 0.95
    assert _corr(north.image[:, 80:560], east.image[:, 80:560]) < 0.5
    (tlx, tly), spec = east.truth_polygon[0], east.spec
    assert tlx > spec.cx and tly > spec.cy   # image top-left is north-east of the centre


def test_footprint_area_scale_and_tilt(data_dir: Path) -> None:
    path = data_dir / NL
    nadir = render_view(str(path), _centre_spec(path, 60.0))
    assert _area(nadir.truth_polygon) == pytest.approx(60.0 ** 2 * 4 / 3, rel=0.01)
    bigger = render_view(str(path), _centre_spec(path, 60.0, scale=1.2))
    assert _area(bigger.truth_polygon) == pytest.approx(_area(nadir.truth_polygon) * 1.44, rel=0.01)

    tilted = render_view(str(path), _centre_spec(path, 60.0, tilt_deg=25.0, tilt_azimuth_deg=0.0))
    tl, tr, br, bl = np.array(tilted.truth_polygon)
    far, near = np.linalg.norm(tr - tl), np.linalg.norm(br - bl)
    assert far > 1.3 * near                                   # the far (north, top) side is wider
    cy = tilted.spec.cy
    assert (tl[1] + tr[1]) / 2 - cy > 1.5 * (cy - (bl[1] + br[1]) / 2)
    assert _area(tilted.truth_polygon) > 1.3 * _area(nadir.truth_polygon)
    assert near == pytest.approx(80.0, rel=0.15)              # the near edge stays close to nadir size


def test_oblique_pixels_come_from_where_image_to_crs_says(data_dir: Path) -> None:
    # The truth must hold for every pixel, not just the corners: sample the raster through the
    # view's homography and compare with the rendered pixels.
    path = data_dir / NL
    spec = _centre_spec(path, 60.0, heading_deg=137.0, tilt_deg=28.0, tilt_azimuth_deg=150.0, scale=1.1)
    view = render_view(str(path), spec)
    info = open_raster(path)
    with rasterio.open(path) as ds:
        raster = ds.read().transpose(1, 2, 0)
    u, v = np.meshgrid(np.arange(4, 640, 9) + 0.5, np.arange(4, 480, 9) + 0.5)
    xyw = np.stack([u.ravel(), v.ravel(), np.ones(u.size)]).T @ view.image_to_crs.T
    cols, rows = ~info.affine * (xyw[:, 0] / xyw[:, 2], xyw[:, 1] / xyw[:, 2])
    sampled = raster[np.floor(rows).astype(int), np.floor(cols).astype(int)]
    rendered = view.image[v.ravel().astype(int), u.ravel().astype(int)]
    assert _corr(sampled, rendered) > 0.9


def test_views_on_an_alpha_raster_avoid_masked_pixels(data_dir: Path) -> None:
    path = data_dir / "bali_pix4d_0.35m_alpha.tif"
    views = make_views(str(path), 8, 60.0, seed=5, photometric=False)
    info = open_raster(path)
    with rasterio.open(path) as ds:
        mask = ds.dataset_mask()
    assert (mask == 0).mean() > 0.05   # the raster really has a masked collar to avoid
    for v in views:
        assert v.valid_fraction == 1.0
        poly = Image.new("L", (info.width, info.height), 0)
        ImageDraw.Draw(poly).polygon([~info.affine * p for p in v.truth_polygon], fill=1, outline=1)
        assert mask[np.asarray(poly, bool)].min() == 255


def test_black_collar_without_nodata_is_avoided(data_dir: Path) -> None:
    # Manila has an 18 % black corner and no nodata tag; views must still show imagery only.
    views = make_views(str(data_dir / "manila_oam_0.10m.tif"), 6, 40.0, seed=2, photometric=False)
    for v in views:
        assert (v.image.max(axis=2) <= 10).mean() < 0.002


def test_same_seed_same_views(data_dir: Path) -> None:
    path = str(data_dir / NL)
    a, b = make_views(path, 3, 50.0, seed=11), make_views(path, 3, 50.0, seed=11)
    c = make_views(path, 3, 50.0, seed=12)
    assert [v.spec for v in a] == [v.spec for v in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [v.spec for v in a] != [v.spec for v in c]
    assert render_view(path, a[0].spec).image.tobytes() == a[0].image.tobytes()


def test_sixteen_bit_single_band(data_dir: Path) -> None:
    path = data_dir / "atlanta_spacenet_pan_0.5m_uint16.tif"
    (v,) = make_views(str(path), 1, 120.0, seed=0, photometric=False)
    assert v.image.dtype == np.uint8 and v.image.shape == (480, 640, 3)
    assert (v.image == v.image[..., :1]).all()   # grey in, grey out
    assert v.image.std() > 20   # stretched to use the 8-bit range, not crushed to black


@pytest.mark.parametrize("name, footprint", [("naip_northdakota_5m_2015.tif", 800.0),
                                             ("colorado_hro_0.15m_nodata.tif", 12.0),
                                             ("florida_neon_0.10m.tif", 15.0)])
def test_other_layouts_render(data_dir: Path, name: str, footprint: float) -> None:
    (v,) = make_views(str(data_dir / name), 1, footprint, seed=1, size=(320, 240))
    assert v.image.shape == (240, 320, 3) and v.image.std() > 5
    assert len(v.truth_polygon) == 4 and v.crs_wkt


def test_random_spec_ranges_and_refusals(data_dir: Path) -> None:
    info = open_raster(data_dir / NL)
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, info, 40.0, max_tilt_deg=20.0, scale_range=(0.9, 1.1)) for _ in range(20)]
    assert all(0 <= s.tilt_deg <= 20 and 0.9 <= s.scale <= 1.1 and 0 <= s.heading_deg < 360 for s in specs)
    assert max(s.heading_deg for s in specs) - min(s.heading_deg for s in specs) > 180
    assert len({s.jpeg_quality for s in specs}) > 1
    with pytest.raises(InputError):
        random_spec(rng, info, 400.0)   # wider than the 250 m raster
    with pytest.raises(InputError):
        ViewSpec(0.0, 0.0, 50.0, tilt_deg=60.0)


def test_photometric_changes_look_not_geometry(data_dir: Path) -> None:
    path = data_dir / NL
    plain = render_view(str(path), _centre_spec(path, 80.0))
    spec = _centre_spec(path, 80.0, brightness=1.15, contrast=0.85, saturation=0.7, hue_shift=6.0, gamma=1.2,
                        blur_sigma=1.0, noise_sigma=3.0, jpeg_quality=70)
    jittered = render_view(str(path), spec)
    assert jittered.truth_polygon == plain.truth_polygon
    assert not np.array_equal(jittered.image, plain.image)
    assert _corr(jittered.image, plain.image) > 0.8


def test_render_reads_only_the_window_the_camera_sees(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps rendering fast (timed in `make bench`): a small window, read at about the output size."""
    import rasterio.io

    path = str(data_dir / "manila_oam_0.10m.tif")
    (v,) = make_views(path, 1, 60.0, seed=4)
    reads: list[tuple[float, int]] = []
    real_read = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        win, out_shape = kwargs.get("window"), kwargs.get("out_shape")
        assert win is not None, "a whole-raster read"
        reads.append((float(win.width * win.height) / (self.width * self.height),
                      int(np.prod(out_shape[-2:])) if out_shape else int(win.width * win.height)))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    view = render_view(path, v.spec)
    assert view.image.shape[:2] == (480, 640)
    assert reads, "render_view read nothing through rasterio"
    assert all(share < 0.25 for share, _ in reads), reads
    assert all(pixels <= 4 * 640 * 480 for _, pixels in reads), reads


def test_save_view_writes_image_and_truth(tmp_path: Path, data_dir: Path) -> None:
    (v,) = make_views(str(data_dir / NL), 1, 50.0, seed=3)
    side = save_view(v, str(tmp_path / "out" / "view_001.jpg"))
    assert Path(side).name == "view_001.truth.json"
    with Image.open(tmp_path / "out" / "view_001.jpg") as im:
        assert im.size == (640, 480) and im.format == "JPEG"
    truth = json.loads(Path(side).read_text())
    assert truth["spec"]["heading_deg"] == v.spec.heading_deg
    assert np.allclose(truth["truth_polygon"], v.truth_polygon)
    assert "RD_New" in truth["crs_wkt"] or "Amersfoort" in truth["crs_wkt"]
    lon, lat = truth["centre_lonlat"]
    assert 3 < lon < 8 and 50 < lat < 54


def test_views_kept_inside_a_region(data_dir: Path) -> None:
    """A spatial hold-out: every corner of every view lies in the eastern 40 %, none in the west."""
    from model_backend.learn.datasets.region import Region

    path = data_dir / "naip_northdakota_5m_2020.tif"
    info = open_raster(str(path))
    east = Region(0.6, 0.0, 1.0, 1.0)
    views = make_views(str(path), 6, 400.0, seed=3, region=east, photometric=False, size=(160, 120))
    cut = info.affine * (0.6 * info.width, 0.0)
    for v in views:
        xs = [x for x, _ in v.truth_polygon]
        assert min(xs) >= cut[0] - 1e-6, (min(xs), cut[0])
    with pytest.raises(InputError, match="region 0,0,0.05,1"):
        make_views(str(path), 1, 400.0, seed=3, region=Region(0.0, 0.0, 0.05, 1.0))
    with pytest.raises(InputError, match="four comma-separated"):
        Region.parse("0,0,0.6")
    with pytest.raises(InputError, match="0 <= x0 < x1"):
        Region.parse("0.6,0,0.2,1")

"""Semi-synthetic drone photos cut from a real orthophoto, with exactly known ground truth.

Real drone photos of a georeferenced raster are scarce, so accuracy tests, the benchmark, the
demo and training draw views from the raster itself: a pinhole camera is placed above a ground
point, pitched off nadir, turned to a heading, and the raster is warped into its image; then
exposure, colour, blur, noise and JPEG change the look the way a real camera would. Because the
geometry is ours, the ground quadrilateral each image shows is known exactly (`truth_polygon`).

Conventions: the image's up direction is the camera heading (clockwise from grid north of the
raster's CRS), so a heading of 90° puts east at the top and a query of unknown heading is solved
by rotating the photo. `cx, cy` is the ground point at the image centre (the principal ray), also
when tilted. Ground sizes are real metres (measured geodesically at the view), so a view has the
same size on the ground in UTM, Mercator, national grids or EPSG:4326.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageDraw, ImageFilter
from pyproj import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window

from model_backend.core.errors import InputError
from model_backend.geo.geodesy import GEOD, to_wgs84
from model_backend.geo.raster import RasterInfo, dataset_mask, open_raster
from model_backend.geo.reader import Stretch, compute_stretch
from model_backend.learn.datasets.region import WHOLE, Region

DIAG_FOV_DEG = 84.0
"""Diagonal field of view of the simulated camera: that of most DJI survey cameras (24 mm eq.).

It sets how strongly a tilt distorts the view, so it should match real drones, not be free."""
_BLACK_MAX = 3
"""Without a dataset mask, pixels whose bands are all <= this count as nodata (black collars of
orthophotos exported without a nodata tag, such as the Manila test raster; JPEG keeps them near 0)."""
PHOTO_RANGES = {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.7, 1.3),
                 "hue_shift": (-8.0, 8.0), "gamma": (0.8, 1.25), "blur_sigma": (0.0, 1.2),
                 "noise_sigma": (0.0, 4.0)}
"""What `random_spec` draws from: a spread of real exposure, white-balance and focus differences."""


@dataclass(frozen=True)
class ViewSpec:
    """What to simulate; every field has a neutral default so a plain nadir view is short to write."""

    cx: float
    """Ground point at the image centre, raster CRS."""
    cy: float
    footprint_m: float
    """Ground width of the image's short side at nadir (before `scale`)."""
    heading_deg: float = 0.0
    """Camera heading, clockwise from north; the image top points this way."""
    tilt_deg: float = 0.0
    """Off-nadir tilt of the optical axis (0..40; far side covers more ground)."""
    tilt_azimuth_deg: float = 0.0
    """Direction the tilted camera looks towards, clockwise from north."""
    scale: float = 1.0
    """Multiplicative jitter on the footprint: the true short side at nadir is footprint_m * scale."""
    brightness: float = 1.0
    """Exposure gain."""
    contrast: float = 1.0
    """Stretch about the image's mean grey."""
    saturation: float = 1.0
    hue_shift: float = 0.0
    """Degrees of hue rotation (white balance error)."""
    gamma: float = 1.0
    blur_sigma: float = 0.0
    """Gaussian blur, output pixels (defocus, motion)."""
    noise_sigma: float = 0.0
    """Gaussian sensor noise, in 0..255 grey levels."""
    jpeg_quality: int = 0
    """JPEG round trip at this quality; 0 skips it."""

    def __post_init__(self) -> None:
        if not (self.footprint_m > 0 and self.scale > 0):
            raise InputError(f"Footprint and scale must be positive, not {self.footprint_m}, {self.scale}.")
        if not 0 <= self.tilt_deg <= 40:
            raise InputError(f"Tilt {self.tilt_deg}° is outside 0..40°; steeper views see the horizon.")
        if not 0 <= self.jpeg_quality <= 100:
            raise InputError(f"JPEG quality {self.jpeg_quality} is outside 0..100.")


@dataclass
class SyntheticView:
    image: np.ndarray
    """H x W x 3 uint8."""
    spec: ViewSpec
    truth_polygon: list[tuple[float, float]]
    """Ground corners seen, raster CRS, in image order (top-left, top-right, bottom-right,
    bottom-left: clockwise on the map), not closed."""
    crs_wkt: str = ""
    image_to_crs: np.ndarray | None = None
    """3x3 homography from image coordinates (x right, y down, pixel centres at +0.5) to the CRS."""
    valid_fraction: float = 1.0
    """Share of image pixels drawn from valid (unmasked) raster data."""


def render_view(raster_path: str, spec: ViewSpec, size: tuple[int, int] = (640, 480)) -> SyntheticView:
    """Render one view; only the window the camera sees is read, at about the output resolution."""
    info = _open(raster_path)
    with rasterio.open(info.path) as ds:
        return _render(ds, info, spec, size)


def make_views(raster_path: str, n: int, footprint_m: float, seed: int, *,
               size: tuple[int, int] = (640, 480), **kw) -> list[SyntheticView]:
    """`n` random views (see `random_spec` for `kw`), the same ones for the same seed."""
    info = _open(raster_path)
    rng = np.random.default_rng(seed)
    with rasterio.open(info.path) as ds:
        specs = [random_spec(rng, info, footprint_m, size=size, dataset=ds, **kw) for _ in range(n)]
        return [_render(ds, info, s, size) for s in specs]


def random_spec(rng: np.random.Generator, info: RasterInfo, footprint_m: float, *, max_tilt_deg: float = 30.0,
                scale_range: tuple[float, float] = (0.8, 1.2), margin_m: float | None = None,
                photometric: bool = True, size: tuple[int, int] = (640, 480), max_tries: int = 200,
                dataset: rasterio.io.DatasetReader | None = None, region: Region = WHOLE) -> ViewSpec:
    """Draw a view whose whole footprint lies inside the raster, on valid data, at any heading.

    The tilt mostly looks forward (a gimbal pitched ahead) with some sideways spread (roll,
    wind). Centres are uniform over the positions where the view fits; a draw whose view leaves
    the raster or touches nodata/alpha=0 is redrawn whole (so a steep tilt that cannot fit a
    small raster gives way to a smaller one instead of failing), and tests and training never
    see fill pixels. `dataset` lets a caller drawing many views reuse one open handle. `region`: the
    whole view (not only its centre) stays inside that part of the raster, e.g. the part a model was
    not trained on.
    """
    a = info.affine
    ccol, crow = info.width / 2.0, info.height / 2.0
    pad = 1.0 + (margin_m or 0.0) / min(info.gsd_x_m, info.gsd_y_m)
    c0, r0, c1, r1 = region.pixels(info.width, info.height)
    smallest = _quad_px(info, ViewSpec(*(a * (ccol, crow)), footprint_m, scale=min(scale_range)), size)
    if np.ptp(smallest[:, 0]) + 2 * pad >= c1 - c0 or np.ptp(smallest[:, 1]) + 2 * pad >= r1 - r0:
        where = "the raster" if region == WHOLE else f"the raster's region {region.text()}"
        raise InputError(f"A {footprint_m:g} m view does not fit in {where} ({info.width_m:.0f} x "
                         f"{info.height_m:.0f} m raster); use a smaller footprint.")
    ds = dataset if dataset is not None else rasterio.open(info.path)
    try:
        for _ in range(max_tries):
            heading = float(rng.uniform(0.0, 360.0))
            tilt = float(rng.uniform(0.0, max_tilt_deg))
            geometry = (heading, tilt, float((heading + rng.normal(0.0, 20.0)) % 360.0),
                        float(rng.uniform(*scale_range)))
            photo: dict = {}
            if photometric:
                u = [float(rng.uniform(lo, hi)) for lo, hi in PHOTO_RANGES.values()]
                photo = dict(zip(PHOTO_RANGES, u), jpeg_quality=int(rng.integers(60, 96)))
            # Offsets of the view around its centre barely change across the raster: fit them first.
            quad = _quad_px(info, ViewSpec(*(a * (ccol, crow)), footprint_m, *geometry), size) - (ccol, crow)
            (lx, ly), (hx, hy) = quad.min(0), quad.max(0)
            x0, x1, y0, y1 = c0 - lx + pad, c1 - hx - pad, r0 - ly + pad, r1 - hy - pad
            if x0 >= x1 or y0 >= y1:
                continue
            px, py = rng.uniform(x0, x1), rng.uniform(y0, y1)
            spec = ViewSpec(*(a * (px, py)), footprint_m, *geometry, **photo)
            q = _quad_px(info, spec, size)
            if not region.holds(info.width, info.height, *q.min(0), *q.max(0)):  # the raster's bounds included
                continue
            if _quad_valid(ds, info, q):
                return spec
    finally:
        if dataset is None:
            ds.close()
    raise InputError(f"Found no {footprint_m:g} m view inside the raster's valid data in {max_tries} tries; "
                     "use a smaller footprint or tilt.")


def save_view(view: SyntheticView, path_jpg: str) -> str:
    """Write the image (JPEG at quality 95, or by suffix) and `<stem>.truth.json` beside it."""
    p = Path(path_jpg)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(view.image).save(p, quality=95)
    crs = CRS.from_wkt(view.crs_wkt) if view.crs_wkt else None
    truth = {
        "image": p.name, "width": int(view.image.shape[1]), "height": int(view.image.shape[0]),
        "spec": asdict(view.spec), "truth_polygon": [list(c) for c in view.truth_polygon],
        "crs_wkt": view.crs_wkt, "valid_fraction": view.valid_fraction,
        "image_to_crs": None if view.image_to_crs is None else view.image_to_crs.tolist(),
    }
    if crs is not None:
        tr = to_wgs84(view.crs_wkt)
        truth["centre_lonlat"] = list(tr.transform(view.spec.cx, view.spec.cy))
        truth["truth_polygon_lonlat"] = [list(tr.transform(x, y)) for x, y in view.truth_polygon]
    side = p.with_name(p.stem + ".truth.json")
    side.write_text(json.dumps(truth, indent=1))
    return str(side)


# --- geometry -------------------------------------------------------------------------------

def camera_homography(spec: ViewSpec, size: tuple[int, int]) -> np.ndarray:
    """3x3 map from local ground metres (east, north, 1) around the centre to image coordinates.

    Pinhole at the nadir altitude that makes the short side span footprint_m * scale, rotated
    so the image top faces the heading, then pitched by tilt_deg towards tilt_azimuth_deg about
    the ground centre: the near edge stays close, the far edge stretches away.
    """
    w, h = size
    f = 0.5 * math.hypot(w, h) / math.tan(math.radians(DIAG_FOV_DEG / 2))
    alt = spec.footprint_m * spec.scale * f / min(w, h)
    psi, t, az = (math.radians(v) for v in (spec.heading_deg, spec.tilt_deg, spec.tilt_azimuth_deg))
    down = -np.array([math.sin(psi), math.cos(psi), 0.0])          # image y axis on the ground
    fwd = np.array([0.0, 0.0, -1.0])                                # optical axis at nadir
    rot = np.stack([np.cross(down, fwd), down, fwd])                # rows: camera x, y, z in world
    d = np.array([math.sin(t) * math.sin(az), math.sin(t) * math.cos(az), -math.cos(t)])
    axis = np.cross(fwd, d)
    if np.linalg.norm(axis) > 1e-12:
        k = axis / np.linalg.norm(axis)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        tilt_rot = np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx   # Rodrigues
        rot = rot @ tilt_rot.T
    centre = -alt / math.cos(t) * d                                 # camera position, metres
    kmat = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    return kmat @ np.column_stack([rot[:, 0], rot[:, 1], -rot @ centre])


def _open(path: str) -> RasterInfo:
    """`open_raster`, remembered while the file is unchanged: benchmarks render thousands of views."""
    try:
        st = Path(path).stat()
    except OSError:
        return open_raster(path)   # its message says what is wrong
    return _open_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _open_cached(path: str, mtime_ns: int, size: int) -> RasterInfo:
    return open_raster(path)


def _local_gsd(info: RasterInfo, px: float, py: float) -> tuple[float, float]:
    """Ground metres per pixel at a raster position (Mercator and lon/lat scale varies across a map)."""
    a, n = info.affine, 16.0
    pts = [a * (px - n, py), a * (px + n, py), a * (px, py - n), a * (px, py + n)]
    lon, lat = to_wgs84(info.crs_wkt).transform([p[0] for p in pts], [p[1] for p in pts])
    dx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2] / (2 * n)
    dy = GEOD.inv(lon[2], lat[2], lon[3], lat[3])[2] / (2 * n)
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        return info.gsd_x_m, info.gsd_y_m
    return dx, dy


def _image_to_px(info: RasterInfo, spec: ViewSpec, size: tuple[int, int]) -> np.ndarray:
    """3x3 homography from image coordinates to raster pixel coordinates (corner-based)."""
    a = info.affine
    pc, pr = ~a * (spec.cx, spec.cy)
    gx, gy = _local_gsd(info, pc, pr)
    sx, sy = math.copysign(1.0, a.a), math.copysign(1.0, -a.e)     # north-up rasters: +1, +1
    metres_to_px = np.array([[sx / gx, 0, pc], [0, -sy / gy, pr], [0, 0, 1.0]])
    return metres_to_px @ np.linalg.inv(camera_homography(spec, size))


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.column_stack([pts, np.ones(len(pts))]) @ m.T
    if (q[:, 2] <= 0).any():
        raise InputError("The camera sees the horizon at this tilt; use a smaller tilt.")
    return q[:, :2] / q[:, 2:]


def _corners(size: tuple[int, int]) -> np.ndarray:
    return np.array([[0, 0], [size[0], 0], [size[0], size[1]], [0, size[1]]], dtype=np.float64)


def _quad_px(info: RasterInfo, spec: ViewSpec, size: tuple[int, int]) -> np.ndarray:
    return _apply(_image_to_px(info, spec, size), _corners(size))


# --- reading and validity -------------------------------------------------------------------

def _window(info: RasterInfo, quad: np.ndarray, pad: int = 2) -> Window:
    c0, r0 = np.floor(quad.min(0)).astype(int) - pad
    c1, r1 = np.ceil(quad.max(0)).astype(int) + pad
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, info.width), min(r1, info.height)
    if c1 <= c0 or r1 <= r0:
        raise InputError("The view lies outside the raster; pick a centre inside it.")
    return Window(c0, r0, c1 - c0, r1 - r0)


def _read_valid(ds: rasterio.io.DatasetReader, info: RasterInfo, win: Window, shape: tuple[int, int],
                rgb: np.ndarray | None = None) -> np.ndarray:
    """Validity (bool) of a window read at `shape`: the dataset mask, else not near-black."""
    if info.has_mask:
        return dataset_mask(ds, window=win, out_shape=shape, resampling=Resampling.average) == 255
    if rgb is None:
        bands = list(dict.fromkeys(info.rgb_bands))
        rgb = ds.read(bands, window=win, out_shape=(len(bands), *shape), resampling=Resampling.average)
    return (rgb > _BLACK_MAX).any(axis=0)


def _box3(m: np.ndarray) -> np.ndarray:
    """Count of set pixels in each 3x3 neighbourhood."""
    p = np.pad(m, 1).astype(np.int16)
    h, w = m.shape
    return sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _blobs(invalid: np.ndarray) -> np.ndarray:
    """Invalid pixels that belong to an area (collar, hole), forgiving isolated specks.

    A nodata value that real pixels also take (0 or 255 in uint8) marks scattered single pixels
    inside good imagery (the Colorado and Florida test rasters); refusing every view that holds
    one would refuse them all. Kept: pixels within one pixel of a 3x3 neighbourhood that is 2/3 invalid.
    """
    core = _box3(invalid) >= 6
    return invalid & (_box3(core) > 0)


def _quad_valid(ds: rasterio.io.DatasetReader, info: RasterInfo, quad: np.ndarray) -> bool:
    """True when the quadrilateral covers valid data only (isolated invalid specks forgiven)."""
    win = _window(info, quad, pad=1)
    dec = max(1.0, max(win.width, win.height) / 512.0)       # average keeps any hole visible
    shape = (max(1, round(win.height / dec)), max(1, round(win.width / dec)))
    valid = _read_valid(ds, info, win, shape)
    sx, sy = shape[1] / win.width, shape[0] / win.height
    poly = Image.new("L", (shape[1], shape[0]), 0)
    pts = [((x - win.col_off) * sx, (y - win.row_off) * sy) for x, y in quad]
    ImageDraw.Draw(poly).polygon(pts, fill=1, outline=1)
    inside = np.asarray(poly, dtype=bool)
    bad = np.count_nonzero(inside & _blobs(~valid))
    return bad == 0


@lru_cache(maxsize=8)
def _stretch(info: RasterInfo) -> Stretch:
    """The indexer's raster-wide 16-bit stretch, so a view's tones match the tiles it is scored against
    (photometric jitter then varies them as a camera would)."""
    return compute_stretch(info)


def _render(ds: rasterio.io.DatasetReader, info: RasterInfo, spec: ViewSpec,
            size: tuple[int, int]) -> SyntheticView:
    w, h = size
    m = _image_to_px(info, spec, size)
    quad = _apply(m, _corners(size))
    win = _window(info, quad)
    # Raster pixels per output pixel where the view is finest: read at that resolution (never finer
    # than the raster), so the near side keeps its detail and the read stays small.
    g = np.stack(np.meshgrid(np.linspace(0, w, 5), np.linspace(0, h, 5)), -1).reshape(-1, 2)
    dec = max(1.0, float(_local_scale(m, g[:, 0], g[:, 1]).min()))
    shape = (max(1, math.ceil(win.height / dec)), max(1, math.ceil(win.width / dec)))
    bands = list(info.rgb_bands)
    resampling = Resampling.average if dec > 1.0 else Resampling.nearest
    data = ds.read(bands, window=win, out_shape=(3, *shape), resampling=resampling)
    valid = _read_valid(ds, info, win, shape, rgb=data)
    data = _stretch(info).apply(data)
    data[:, ~valid] = 0
    to_read = np.array([[shape[1] / win.width, 0, -win.col_off * shape[1] / win.width],
                        [0, shape[0] / win.height, -win.row_off * shape[0] / win.height], [0, 0, 1.0]])
    mr = to_read @ m
    img = _warp(Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0))), mr, size)
    vmask = _warp(Image.fromarray((valid * 255).astype(np.uint8)), mr, size, mip=False)
    valid_fraction = float(np.count_nonzero(np.asarray(vmask) >= 128)) / (w * h)
    img = _photometric(img, spec)
    image_to_crs = np.array(info.affine).reshape(3, 3) @ m
    corners = _apply(image_to_crs, _corners(size))
    return SyntheticView(
        image=img, spec=spec, truth_polygon=[(float(x), float(y)) for x, y in corners], crs_wkt=info.crs_wkt,
        image_to_crs=image_to_crs / image_to_crs[2, 2], valid_fraction=valid_fraction,
    )


def _local_scale(m: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Source pixels per output pixel (linear) of homography m at (u, v): sqrt|det J| = sqrt|det m / w^3|."""
    den = m[2, 0] * u + m[2, 1] * v + m[2, 2]
    return np.sqrt(abs(np.linalg.det(m)) / np.abs(den) ** 3)


def _warp(src: Image.Image, m: np.ndarray, size: tuple[int, int], mip: bool = True) -> Image.Image:
    """Perspective warp with mip-mapping: a tilted view's far side shrinks the source up to ~3x, and
    plain bilinear sampling would alias it into sparkle and moiré no camera produces. Each output
    pixel blends the two 2x-pyramid levels around its own local scale (trilinear filtering)."""
    u, v = np.meshgrid(np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5)
    lam = np.clip(np.log2(np.maximum(_local_scale(m, u, v), 1e-6)), 0.0, 4.0) if mip else np.zeros(1)
    levels = int(math.ceil(float(lam.max()) - 0.25))
    out, level = None, src
    for k in range(levels + 1):
        if k:
            level = level.reduce(2)
        mk = np.diag([0.5 ** k, 0.5 ** k, 1.0]) @ m
        warped = level.transform(size, Image.PERSPECTIVE, tuple((mk / mk[2, 2]).ravel()[:8]), Image.BILINEAR)
        if levels == 0:
            return warped
        weight = np.clip(1.0 - np.abs(lam - k), 0.0, 1.0)
        if k == levels:  # the coarsest level also takes anything coarser still
            weight[lam > k] = 1.0
        out = weight[..., None] * np.asarray(warped, np.float32) + (0 if out is None else out)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


# --- photometry -----------------------------------------------------------------------------

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def _photometric(img: Image.Image, s: ViewSpec) -> np.ndarray:
    """Camera-like changes: tone (gamma, gain, contrast), colour (saturation, hue), optics, sensor, JPEG."""
    seed = zlib.crc32(repr(s).encode())   # the same spec gives the same noise
    if (s.gamma, s.brightness, s.contrast, s.saturation, s.hue_shift) != (1.0, 1.0, 1.0, 1.0, 0.0):
        x = np.asarray(img, np.float32) / 255.0
        x = np.power(x, s.gamma) * s.brightness
        x = (x - x.mean()) * s.contrast + x.mean()
        a = math.radians(s.hue_shift)
        chroma = s.saturation * np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)],
                                          [0, math.sin(a), math.cos(a)]], np.float32)
        chroma[0, 0] = 1.0
        x = x @ (_YIQ2RGB @ chroma @ _RGB2YIQ).T
        img = Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if s.blur_sigma > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(s.blur_sigma))
    if s.noise_sigma > 0:
        noise = np.random.default_rng(seed).standard_normal((img.height, img.width, 3), np.float32)
        noise *= s.noise_sigma
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    if s.jpeg_quality > 0:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(s.jpeg_quality))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()

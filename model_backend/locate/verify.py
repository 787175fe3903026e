"""From a best tile to the photo's footprint: local features, a homography, and a sanity check.

Retrieval gives the best-matching *tile*: a quarter to half a footprint off the truth, with no
heading or extent. Here the photo's SIFT keypoints (RootSIFT, Lowe's ratio test) are matched
with the raster around each candidate, a homography is fitted with MAGSAC, and it is kept only
when it is geometrically sane: enough inliers, a convex, non-mirrored quadrilateral without
extreme angles, and a ground area near the footprint the photo is expected to cover. A kept
homography maps the photo's corners to the ground: footprint, centre, heading and resolution.

Speed drives the layout. SIFT costs about 0.07 s per quarter-megapixel crop on two cores, so
every candidate is read at one working resolution (crop side <= `max_crop_px`), the photo is
detected once at that resolution (not per candidate), and one rasterio dataset serves every
read. A candidate whose neighbourhood already holds a better verified footprint is not matched
again: it would only find that footprint a second time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from model_backend.geo.geodesy import to_wgs84
from model_backend.geo.raster import RasterInfo, dataset_mask
from model_backend.geo.reader import Stretch, compute_stretch
from model_backend.locate.candidates import Candidate

CONF_COEF = (-8.6, 4.2, 2.3)
"""Confidence = sigmoid(a + b ln(inliers) + c inlier_ratio), fitted by logistic regression
on 622 sane homographies from semi-synthetic views (model_backend.learn.datasets.synth;
30 views per raster, calibration seed 5, not the benchmark's 11) of the manila, netherlands, bali
and florida test rasters, matched against their top-10 retrieval candidates and a decoy raster's
(gates loosened to 4 inliers; the fitting code, unused since, is in the history at 57a72c3:
model_backend/evaluation.py). The 18 wrong ones had at most 10
inliers, hence `min_inliers` = 15. Calibrated on synthetic views only: on real photos read it as
a ranking more than a probability."""


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of geometric verification; the defaults are what the benchmark measured."""

    top_k: int = 10
    """Retrieval candidates verified per photo."""
    context: float = 0.75
    """Footprints of raster added on each side of a candidate tile: retrieval's hits are within a footprint,
    and a tighter window at the same crop size means finer pixels (1.0 verified 3 % fewer views)."""
    max_crop_px: int = 512
    """Longest side of a candidate crop; SIFT time grows with its square."""
    photo_oversample: float = 1.0
    """Photo detected at this many times the crop's resolution (SIFT bridges modest scale gaps)."""
    max_features: int = 2000
    ratio: float = 0.8
    reproj_px: float = 3.0
    """MAGSAC's inlier threshold, in crop pixels."""
    min_inliers: int = 15
    """No wrong place reached 11 inliers in calibration; right ones: median 74, 90 % above 14."""
    min_inlier_ratio: float = 0.1
    area_range: tuple[float, float] = (0.3, 4.0)
    """Ground area of the footprint relative to footprint_m^2 x aspect: tilt and scale widen it."""
    min_angle_deg: float = 25.0
    """Smallest interior angle of the footprint quadrilateral."""
    threshold: float = 0.5
    """Confidence at and above which a candidate counts as verified."""
    skip_covered: bool = True
    """Do not match a candidate whose neighbourhood holds a better verified footprint's centre."""


DEFAULT_VERIFY = VerifyConfig()


@dataclass
class Verification:
    """The outcome of matching the photo around one candidate."""

    verified: bool = False
    confidence: float = 0.0
    inliers: int = 0
    matches: int = 0
    reason: str = ""
    """Why it was rejected ('' when verified)."""
    quad: list[tuple[float, float]] = field(default_factory=list)
    """Photo corners on the ground (top-left, top-right, bottom-right, bottom-left), raster CRS."""
    centre: tuple[float, float] | None = None
    """Ground point under the photo's centre, raster CRS."""
    heading_deg: float | None = None
    """Direction of the photo's top edge, clockwise from grid north."""
    gsd_m: float | None = None
    """Mean ground metres per photo pixel."""
    image_to_crs: np.ndarray | None = None
    """3x3 homography from photo pixels (continuous, corners at 0 and w/h) to the raster CRS."""

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0


@dataclass
class _Features:
    pts: np.ndarray
    """(N, 2) float32 keypoints in continuous pixel coordinates of the *original* image."""
    desc: np.ndarray
    """(N, 128) float32 RootSIFT descriptors."""


def confidence(inliers: int, inlier_ratio: float, coef: tuple[float, float, float] = CONF_COEF) -> float:
    """Probability that a sane homography is the right place, from its support (logistic)."""
    if inliers <= 0:
        return 0.0
    z = coef[0] + coef[1] * math.log(inliers) + coef[2] * inlier_ratio
    return 1.0 / (1.0 + math.exp(-min(max(z, -50.0), 50.0)))


class Verifier:
    """Verify places for one photo on one raster; holds the open dataset and the photo's keypoints."""

    def __init__(self, info: RasterInfo, photo: np.ndarray, footprint_m: float,
                 cfg: VerifyConfig = VerifyConfig(), dataset: rasterio.io.DatasetReader | None = None) -> None:
        self.info, self.cfg, self.footprint_m = info, cfg, float(footprint_m)
        self.h, self.w = photo.shape[:2]
        self._grey = cv2.cvtColor(np.ascontiguousarray(photo[..., :3]), cv2.COLOR_RGB2GRAY)
        self._own = dataset is None
        self.ds = dataset if dataset is not None else rasterio.open(info.path)
        self._stretch = None if info.dtype == "uint8" else compute_stretch(info)
        self._sift = cv2.SIFT_create(nfeatures=cfg.max_features)
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._photo_cache: dict[float, _Features] = {}
        self._photo_gsd = self.footprint_m / min(self.h, self.w)
        half = (0.5 + cfg.context) * self.footprint_m
        self.half_m = half
        self.gsd = max(min(info.gsd_x_m, info.gsd_y_m), self._photo_gsd, 2 * half / cfg.max_crop_px)
        # Ground metres per CRS unit along x and y: Mercator and degree units are not ground metres.
        self.mx, self.my = info.gsd_x_m / abs(info.affine.a), info.gsd_y_m / abs(info.affine.e)

    def close(self) -> None:
        if self._own:
            self.ds.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def covers(self, cx: float, cy: float, x: float, y: float) -> bool:
        """Whether the neighbourhood read for a candidate at (cx, cy) contains ground point (x, y)."""
        return abs(x - cx) * self.mx <= self.half_m and abs(y - cy) * self.my <= self.half_m

    def ground_m(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Ground metres between two nearby points of the raster CRS."""
        return math.hypot((x1 - x0) * self.mx, (y1 - y0) * self.my)

    def verify(self, cx: float, cy: float) -> Verification:
        """Match the photo around ground point (cx, cy) of the raster CRS."""
        crop = self._read(cx, cy)
        if crop is None:
            return Verification(reason="outside the raster")
        grey, mask, crop_to_crs = crop
        ref = self._detect(grey, mask)
        photo = self._photo_features()
        if len(ref.pts) < 4 or len(photo.pts) < 4:
            return Verification(reason="too few features")
        pairs = self._matcher.knnMatch(photo.desc, ref.desc, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.cfg.ratio * p[1].distance]
        if len(good) < max(4, self.cfg.min_inliers):
            return Verification(matches=len(good), reason="too few matches")
        src = photo.pts[[m.queryIdx for m in good]]
        dst = ref.pts[[m.trainIdx for m in good]]
        method = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
        hmat, inl = cv2.findHomography(src, dst, method, self.cfg.reproj_px, maxIters=5000, confidence=0.999)
        if hmat is None or inl is None:
            return Verification(matches=len(good), reason="no homography")
        return self._judge(crop_to_crs @ hmat, int(inl.sum()), len(good))

    # -- pieces --------------------------------------------------------------------------------

    def _judge(self, image_to_crs: np.ndarray, inliers: int, matches: int) -> Verification:
        """Sanity of the footprint the homography implies, then its confidence and geometry."""
        out = Verification(inliers=inliers, matches=matches)
        w, h = self.w, self.h
        pts = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1], [w / 2, h / 2, 1], [w / 2, 0, 1]], float)
        p = pts @ image_to_crs.T
        if not ((p[:, 2] > 0).all() or (p[:, 2] < 0).all()):
            out.reason = "footprint crosses the horizon"
            return out
        xy = p[:, :2] / p[:, 2:]
        quad = xy[:4]
        out.quad = [(float(x), float(y)) for x, y in quad]
        out.centre = (float(xy[4, 0]), float(xy[4, 1]))
        up = xy[5] - xy[4]
        out.heading_deg = float(math.degrees(math.atan2(up[0] * self.mx, up[1] * self.my)) % 360.0)
        area = abs(_signed_area(quad)) * self.mx * self.my
        out.gsd_m = float(math.sqrt(area / (w * h)))
        out.image_to_crs = image_to_crs / image_to_crs[2, 2]
        out.reason = self._problem(quad, area, inliers, matches)
        if not out.reason:
            out.confidence = confidence(inliers, out.inlier_ratio)
            if out.confidence < self.cfg.threshold:
                out.reason = f"low confidence {out.confidence:.2f}"
        out.verified = not out.reason
        return out

    def _problem(self, quad: np.ndarray, area_m2: float, inliers: int, matches: int) -> str:
        """Why this footprint cannot be the photo's ('' when it can)."""
        cfg = self.cfg
        if inliers < cfg.min_inliers:
            return f"{inliers} inliers"
        if inliers < cfg.min_inlier_ratio * matches:
            return f"inlier ratio {inliers / matches:.2f}"
        # Image corners run clockwise on a north-up map (image y points down); anything else is a mirror.
        edges = np.roll(quad, -1, axis=0) - quad
        nxt = np.roll(edges, -1, axis=0)
        if not (edges[:, 0] * nxt[:, 1] - edges[:, 1] * nxt[:, 0] < 0).all():
            return "footprint not convex or mirrored"
        cos = -(edges * nxt).sum(1) / (np.linalg.norm(edges, axis=1) * np.linalg.norm(nxt, axis=1) + 1e-12)
        if np.degrees(np.arccos(np.clip(cos, -1, 1))).min() < cfg.min_angle_deg:
            return "footprint too skewed"
        rel = area_m2 / (self.footprint_m ** 2 * max(self.w, self.h) / min(self.w, self.h))
        if not cfg.area_range[0] <= rel <= cfg.area_range[1]:
            return f"footprint {rel:.2f}x the expected area"
        return ""

    def _photo_features(self) -> _Features:
        """Photo keypoints at the working resolution: detected once per photo, not per candidate."""
        gsd = self.gsd / self.cfg.photo_oversample
        key = round(gsd, 6)
        if key not in self._photo_cache:
            f = min(1.0, self._photo_gsd / gsd)
            img = self._grey if f >= 0.999 else cv2.resize(
                self._grey, (max(8, round(self.w * f)), max(8, round(self.h * f))), interpolation=cv2.INTER_AREA)
            feats = self._detect(img, None)
            feats.pts *= np.array([self.w / img.shape[1], self.h / img.shape[0]], np.float32)
            self._photo_cache[key] = feats
        return self._photo_cache[key]

    def _detect(self, grey: np.ndarray, mask: np.ndarray | None) -> _Features:
        kps, desc = self._sift.detectAndCompute(grey, mask)
        if desc is None or not kps:
            return _Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
        desc = desc / (np.abs(desc).sum(axis=1, keepdims=True) + 1e-7)    # RootSIFT: L1, then sqrt
        pts = np.array([k.pt for k in kps], np.float32) + 0.5              # OpenCV: pixel centres at integers
        return _Features(pts, np.sqrt(desc).astype(np.float32))

    def _read(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
        """Grey crop around (cx, cy) at the working resolution, its valid mask, and crop pixel -> CRS."""
        info, gsd = self.info, self.gsd
        pc, pr = ~info.affine * (cx, cy)
        hx, hy = self.half_m / info.gsd_x_m, self.half_m / info.gsd_y_m
        c0, r0 = max(0.0, pc - hx), max(0.0, pr - hy)
        c1, r1 = min(float(info.width), pc + hx), min(float(info.height), pr + hy)
        if c1 - c0 < 16 or r1 - r0 < 16:
            return None
        win = Window(c0, r0, c1 - c0, r1 - r0)
        ow = max(16, round((c1 - c0) * info.gsd_x_m / gsd))
        oh = max(16, round((r1 - r0) * info.gsd_y_m / gsd))
        grey, valid = read_grey(self.ds, info, self._stretch, win, (oh, ow))
        mask = None
        if not valid.all():  # no keypoints on nodata or its edge (the edge is a strong false corner)
            mask = cv2.erode(valid.astype(np.uint8) * 255, np.ones((7, 7), np.uint8))
        to_px = np.array([[(c1 - c0) / ow, 0, c0], [0, (r1 - r0) / oh, r0], [0, 0, 1.0]])
        return grey, mask, np.array(info.affine, float).reshape(3, 3) @ to_px


def read_grey(ds: rasterio.io.DatasetReader, info: RasterInfo, stretch: Stretch | None, win: Window,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A raster window read as grey uint8 of `shape` (rows, cols) and its valid mask: averaged down,
    bilinear up, stretched when the raster is not 8-bit; nodata from the mask, else black collars."""
    oh, ow = shape
    up = ow > win.width or oh > win.height
    data = ds.read(list(info.rgb_bands), window=win, out_shape=(3, oh, ow),
                   resampling=Resampling.bilinear if up else Resampling.average)
    if info.has_mask:
        valid = dataset_mask(ds, window=win, out_shape=(oh, ow), resampling=Resampling.nearest) > 0
    else:
        valid = data.max(axis=0) > 0   # undeclared black collars, as the tile reader treats them
    if stretch is not None:
        data = stretch.apply(data)
    return cv2.cvtColor(np.ascontiguousarray(np.moveaxis(data, 0, -1)), cv2.COLOR_RGB2GRAY), valid


def verify_candidates(info: RasterInfo, photo: np.ndarray, candidates: list[Candidate], footprint_m: float,
                      cfg: VerifyConfig = VerifyConfig(), dataset: rasterio.io.DatasetReader | None = None
                      ) -> tuple[list[Candidate], float]:
    """Verify the first cfg.top_k candidates, refine the verified ones, re-rank all; (candidates, seconds).

    Ranking: verified first (by retrieval score + confidence), then the others in the order given. A verified
    candidate takes the photo's footprint as its polygon and the photo centre's ground point as x/y (its tile stays
    in tile_x/tile_y/tile_polygon). Candidates that would repeat a better verified footprint
    (same place within half a footprint, or skipped because their neighbourhood holds it) are
    marked unverified with confidence 0.
    """
    t0 = time.perf_counter()
    out: list[Candidate] = []
    found: list[tuple[float, float]] = []
    with Verifier(info, photo, footprint_m, cfg, dataset) as ver:
        for i, c in enumerate(candidates):
            if i >= cfg.top_k:
                out.append(replace(c, verified=False, confidence=0.0, inliers=0, **_tile(c)))
                continue
            if cfg.skip_covered and any(ver.covers(c.x, c.y, *xy) for xy in found):
                out.append(replace(c, verified=False, confidence=0.0, inliers=0, **_tile(c)))
                continue
            v = ver.verify(c.x, c.y)
            if v.verified and any(ver.ground_m(*v.centre, x, y) < 0.5 * footprint_m for x, y in found):
                v = Verification(reason="same place as a better candidate")
            out.append(_apply(c, v, info.crs_wkt))
            if v.verified:
                found.append(v.centre)
    # Stable: the unverified keep the order they came in (the embedding's, or the structure re-rank's).
    out.sort(key=lambda c: (not c.verified, -(c.score + (c.confidence or 0.0)) if c.verified else 0.0))
    return [replace(c, rank=i + 1) for i, c in enumerate(out)], time.perf_counter() - t0


def _tile(c: Candidate) -> dict[str, float]:
    """Where the candidate's tile was: kept from the structure re-rank when it moved the candidate."""
    return {"tile_x": c.x if c.tile_x is None else c.tile_x, "tile_y": c.y if c.tile_y is None else c.tile_y}


def _apply(c: Candidate, v: Verification, crs_wkt: str) -> Candidate:
    """The candidate with a verification's outcome: refined geometry when verified."""
    base = replace(c, verified=v.verified, confidence=round(v.confidence, 4), inliers=v.inliers,
                   **_tile(c))
    if not v.verified or v.centre is None:
        return base
    lon, lat = to_wgs84(crs_wkt).transform(*v.centre)
    ring = list(v.quad) + [v.quad[0]]
    if _signed_area(np.array(ring[:4])) < 0:  # image order is clockwise on the map; rings are CCW
        ring.reverse()
    return replace(base, x=v.centre[0], y=v.centre[1], lon=float(lon), lat=float(lat), polygon=ring,
                   heading_deg=round(v.heading_deg, 2), gsd_m=round(v.gsd_m, 4),
                   tile_polygon=c.tile_polygon or c.polygon,
                   image_to_crs=None if v.image_to_crs is None else np.asarray(v.image_to_crs).tolist())


def _signed_area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum())

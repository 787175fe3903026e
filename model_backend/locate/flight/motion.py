"""How far the drone moved between two consecutive photos, from the photos themselves.

Consecutive photos of a flight overlap (50-70 % in a survey), so matching one against the next
measures the move between them: a similarity transform fitted to SIFT matches (RANSAC) maps the
next photo's centre into the previous photo, and that offset, as a fraction of the previous photo's
short side, times its footprint, is the ground distance flown. Its length needs no heading and no
map, so it constrains the track even where the map matches poorly (another year's crops): a track
that hops between look-alike places of the map, or stands still on one, contradicts it.

No overlap (a turn, a gap) gives no estimate, and the track falls back on the speed bound alone.
A photo with nothing to match (a bare field, haze: `Features.textured` false) says nothing either
way: its pairs are "unknown", never evidence that the photos do not overlap - over a featureless
stretch that evidence pushed the track away from the true path. Nadir geometry is assumed; a tilted
camera's estimate is rougher, which the decoder's tolerance absorbs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

MAX_SIDE = 640
"""Photos are matched at this longest side: enough for a 50 %-overlap pair, ~0.1 s per pair on 2 cores."""
MIN_INLIERS = 20
RATIO = 0.8
MIN_TEXTURE = 4.0
"""Below this 90th-percentile gradient (grey levels per pixel at 480 px, sensor noise blurred away), a photo
has nothing to match: simulated bare fields read 1.7-2.2; the softest map renders seen, NAIP fields at 5 m
rendered for 400 m photos, read 6 and more (median 14-20)."""


@dataclass(frozen=True)
class Features:
    keypoints: np.ndarray
    """(N, 2) float32 pixel positions at the matching size."""
    descriptors: np.ndarray | None
    short_side: int
    centre: tuple[float, float]
    texture: float = math.inf
    """90th percentile of the gradient magnitude of the photo's grey, blurred (sigma 2 px at 480 px)."""

    @property
    def textured(self) -> bool:
        """Whether a failed match with this photo says anything (see MIN_TEXTURE)."""
        return self.texture >= MIN_TEXTURE


@dataclass(frozen=True)
class Motion:
    shift: float
    """Distance between the two photos' centres, in short sides of the first photo."""
    direction_deg: float
    """Where the second photo's centre lies seen from the first's, clockwise from the first photo's top."""
    rotation_deg: float
    """Rotation of the second photo relative to the first (camera yaw change)."""
    scale: float
    """Second photo's scale relative to the first (> 1: it flew lower)."""
    inliers: int


def features(photo: np.ndarray, max_features: int = 1500) -> Features:
    """SIFT keypoints of a photo at the matching size (RootSIFT descriptors)."""
    grey = cv2.cvtColor(np.ascontiguousarray(photo[..., :3]), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    f = min(1.0, MAX_SIDE / max(h, w))
    if f < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    # Drone photos of fields are soft and low in contrast: equalise locally and accept weak corners, or
    # a blurred 5 m/pixel map rendered at 640 px gives a dozen keypoints and no estimate.
    grey = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(grey)
    kps, desc = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=0.01).detectAndCompute(grey, None)
    pts = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
    if desc is not None and len(desc):
        desc = desc / (np.abs(desc).sum(axis=1, keepdims=True) + 1e-7)
        desc = np.sqrt(desc).astype(np.float32)
    gh, gw = grey.shape
    return Features(pts, desc, min(gh, gw), (gw / 2.0, gh / 2.0), texture(photo))


def texture(photo: np.ndarray) -> float:
    """How much there is to match: see `Features.texture` (measured before any equalisation)."""
    grey = cv2.cvtColor(np.ascontiguousarray(photo[..., :3]), cv2.COLOR_RGB2GRAY)
    f = 480.0 / max(1, min(grey.shape))
    grey = cv2.resize(grey, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    soft = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 2.0)
    magnitude = cv2.magnitude(cv2.Sobel(soft, cv2.CV_32F, 1, 0), cv2.Sobel(soft, cv2.CV_32F, 0, 1))
    return float(np.percentile(magnitude, 90))


def relative_motion(a: Features, b: Features) -> Motion | None:
    """The move from photo a to photo b, or None when they do not overlap enough to say."""
    if a.descriptors is None or b.descriptors is None or len(a.keypoints) < MIN_INLIERS or \
            len(b.keypoints) < MIN_INLIERS:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(b.descriptors, a.descriptors, k=2)
    good = [m for m, *rest in pairs if rest and m.distance < RATIO * rest[0].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = b.keypoints[[m.queryIdx for m in good]]
    dst = a.keypoints[[m.trainIdx for m in good]]
    model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0,
                                              maxIters=2000, confidence=0.995)
    if model is None or mask is None or int(mask.sum()) < MIN_INLIERS:
        return None
    centre = model @ np.array([b.centre[0], b.centre[1], 1.0])
    offset = math.hypot(centre[0] - a.centre[0], centre[1] - a.centre[1])
    scale = math.hypot(model[0, 0], model[1, 0])
    direction = math.degrees(math.atan2(centre[0] - a.centre[0], -(centre[1] - a.centre[1]))) % 360.0
    return Motion(offset / a.short_side, direction, math.degrees(math.atan2(model[1, 0], model[0, 0])),
                  1.0 / scale if scale > 0 else 1.0, int(mask.sum()))

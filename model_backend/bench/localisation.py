"""Localisation accuracy on semi-synthetic drone views with known truth.

Views are simulated from a real orthophoto (tilt, heading, scale, colour, blur: see synth.py)
and located against the index of the same raster with the production query path. A view
counts as found when a candidate's centre lies within one footprint width of the truth on the
ground — the design's definition — and errors are ground metres (geodesic), not map units,
so Mercator and degree rasters are judged fairly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_backend.core.config import QueryConfig, TilingConfig
from model_backend.geo.geodesy import ground_distance_m
from model_backend.geo.raster import open_raster
from model_backend.index.build import build_index
from model_backend.learn.datasets.synth import make_views
from model_backend.locate.candidates import select_candidates
from model_backend.locate.query import embed_photo, score_tiles
from model_backend.locate.verify import DEFAULT_VERIFY, Verifier, VerifyConfig, verify_candidates
from model_backend.nn.embedder import EmbeddingModel


@dataclass
class LocalisationReport:
    raster: str
    n: int
    footprint_m: float
    hit1: float
    hit5: float
    median_error_m: float
    errors_m: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"raster": Path(self.raster).name, "n": self.n, "footprint_m": self.footprint_m,
                "top1": round(self.hit1, 4), "top5": round(self.hit5, 4),
                "median_error_m": round(self.median_error_m, 2)}


def synthetic_localisation(raster: str, n_views: int, footprint_m: float, seed: int, *,
                           embedder: EmbeddingModel, cache_dir: str | None = None,
                           query: QueryConfig = QueryConfig(), **view_kw) -> LocalisationReport:
    idx = build_index(raster, TilingConfig(footprint_m=footprint_m), cache_dir=cache_dir, embedder=embedder)
    views = make_views(raster, n_views, footprint_m, seed, **view_kw)
    crs = idx.grid.crs_wkt
    hit1 = hit5 = 0
    errors = []
    for v in views:
        q = embed_photo(embedder, v.image, query.rotations)
        scores, _ = score_tiles(idx, q)
        cands = select_candidates(idx.grid, idx.cols, idx.rows, scores, 5, query.nms_iou)
        xs = np.array([c.x for c in cands])
        ys = np.array([c.y for c in cands])
        d = ground_distance_m(crs, xs, ys, np.full_like(xs, v.spec.cx), np.full_like(ys, v.spec.cy))
        errors.append(float(d[0]))
        hit1 += bool(d[0] <= footprint_m)
        hit5 += bool((d <= footprint_m).any())
    n = len(views)
    return LocalisationReport(raster, n, footprint_m, hit1 / n, hit5 / n, float(np.median(errors)), errors)


# ---------------------------------------------------------------- geometric verification

@dataclass
class VerifiedReport:
    """Retrieval then verification on synthetic views: what re-ranking and refinement bought."""

    raster: str
    n: int
    footprint_m: float
    hit1_before: float
    """Share of views whose top retrieval candidate is within one footprint of the truth."""
    hit1_after: float
    """The same after verification re-ranked the candidates (and refined the verified ones)."""
    verified: float
    """Share of views whose #1 is verified."""
    precision: float
    """Share of verified #1s that are right: footprint IoU with the truth >= 0.5."""
    median_error_m: float
    """Centre error of verified #1s, ground metres."""
    median_iou: float
    seconds_median: float
    """Verification time per photo (all candidates), on this machine."""
    seconds_max: float
    candidate_precision: float = float("nan")
    """Share of *all* verified candidates (any rank) that are right: wrong places that pass count here."""
    cpu_seconds_median: float = float("nan")
    """CPU time of verification per photo (all threads): what an idle 2-core machine's wall time stays under."""
    errors_m: list[float] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"raster": Path(self.raster).name, "n": self.n, "footprint_m": self.footprint_m,
                "top1_before": round(self.hit1_before, 4), "top1_after": round(self.hit1_after, 4),
                "verified": round(self.verified, 4), "precision": round(self.precision, 4),
                "median_error_m": round(self.median_error_m, 3), "median_iou": round(self.median_iou, 4),
                "verify_s_median": round(self.seconds_median, 3), "verify_s_max": round(self.seconds_max, 3),
                "verify_cpu_s_median": round(self.cpu_seconds_median, 3),
                "candidate_precision": round(self.candidate_precision, 4)}


def footprint_iou(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """IoU of two footprint polygons in the same CRS (0 when either is degenerate)."""
    from shapely.geometry import Polygon

    pa, pb = Polygon(a), Polygon(b)
    if not (pa.is_valid and pb.is_valid) or pa.area <= 0 or pb.area <= 0:
        return 0.0
    return float(pa.intersection(pb).area / pa.union(pb).area)


def verified_localisation(raster: str, n_views: int, footprint_m: float, seed: int, *,
                          embedder: EmbeddingModel, cache_dir: str | None = None,
                          query: QueryConfig = QueryConfig(), verify: VerifyConfig = DEFAULT_VERIFY,
                          **view_kw) -> VerifiedReport:
    """Top-1 before/after verification, centre error and IoU of verified footprints, precision, time."""
    import rasterio

    info = open_raster(raster)
    idx = build_index(raster, TilingConfig(footprint_m=footprint_m), cache_dir=cache_dir, embedder=embedder)
    views = make_views(raster, n_views, footprint_m, seed, **view_kw)
    crs = idx.grid.crs_wkt
    before = after = n_ver = n_right = all_ver = all_right = 0
    errors, ious, secs, cpu = [], [], [], []
    with rasterio.open(info.path) as ds:
        for v in views:
            scores, _ = score_tiles(idx, embed_photo(embedder, v.image, query.rotations))
            cands = select_candidates(idx.grid, idx.cols, idx.rows, scores, max(verify.top_k, query.top_k),
                                      query.nms_iou)
            c0 = time.process_time()
            ranked, s = verify_candidates(info, v.image, cands, footprint_m, verify, dataset=ds)
            secs.append(s)
            cpu.append(time.process_time() - c0)
            d0, d1 = (float(ground_distance_m(crs, np.array([c.x]), np.array([c.y]), np.array([v.spec.cx]),
                                              np.array([v.spec.cy]))[0]) for c in (cands[0], ranked[0]))
            for c in ranked:
                if c.verified:
                    all_ver += 1
                    all_right += footprint_iou(c.polygon, v.truth_polygon) >= 0.5
            before += d0 <= footprint_m
            after += d1 <= footprint_m
            if ranked[0].verified:
                n_ver += 1
                iou = footprint_iou(ranked[0].polygon, v.truth_polygon)
                n_right += iou >= 0.5
                errors.append(d1)
                ious.append(iou)
    n = len(views)
    return VerifiedReport(raster, n, footprint_m, before / n, after / n, n_ver / n,
                          n_right / n_ver if n_ver else float("nan"), _median(errors), _median(ious), _median(secs),
                          float(max(secs)), all_right / all_ver if all_ver else float("nan"), _median(cpu),
                          errors, ious)


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def verification_samples(raster: str, n_views: int, footprint_m: float, seed: int, *, embedder: EmbeddingModel,
                         cache_dir: str | None = None, decoys: str | None = None, top_k: int = 10
                         ) -> list[tuple[int, int, bool]]:
    """(inliers, matches, right) of every geometrically sane homography over the top_k candidates.

    Calibration data for the confidence (verify.CONF_COEF): the gates are loosened (4 inliers,
    threshold 0) so weak, wrong matches show up. `decoys`, another raster, adds certain
    negatives: the views are also matched against its candidates.
    """
    loose = VerifyConfig(top_k=top_k, min_inliers=4, min_inlier_ratio=0.0, threshold=0.0, skip_covered=False)
    views = make_views(raster, n_views, footprint_m, seed)
    out: list[tuple[int, int, bool]] = []
    for target in [raster] + ([decoys] if decoys else []):
        info = open_raster(target)
        idx = build_index(target, TilingConfig(footprint_m=footprint_m), cache_dir=cache_dir, embedder=embedder)
        for v in views:
            scores, _ = score_tiles(idx, embed_photo(embedder, v.image, QueryConfig().rotations))
            cands = select_candidates(idx.grid, idx.cols, idx.rows, scores, top_k, QueryConfig().nms_iou)
            with Verifier(info, v.image, footprint_m, loose) as ver:
                for c in cands:
                    r = ver.verify(c.x, c.y)
                    if r.verified:
                        right = target == raster and footprint_iou(r.quad, v.truth_polygon) >= 0.5
                        out.append((r.inliers, r.matches, bool(right)))
    return out


def fit_confidence(samples: list[tuple[int, int, bool]], l2: float = 1e-3) -> tuple[float, float, float]:
    """Logistic regression (Newton's method) of right ~ 1 + ln(inliers) + inlier_ratio."""
    x = np.array([[1.0, np.log(i), i / max(m, 1)] for i, m, _ in samples])
    y = np.array([float(r) for *_, r in samples])
    w = np.zeros(3)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(3)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1]), float(w[2])

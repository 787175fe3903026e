"""Localisation accuracy on semi-synthetic drone views with known truth.

Views are simulated from a real orthophoto (tilt, heading, scale, colour, blur: see synth.py)
and located against the index of the same raster with the production query path. A view
counts as found when a candidate's centre lies within one footprint width of the truth on the
ground — the design's definition — and errors are ground metres (geodesic), not map units,
so Mercator and degree rasters are judged fairly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig
from model_backend.geo.geodesy import ground_distance_m
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets.synth import make_views
from model_backend.locate.candidates import select_candidates
from model_backend.locate.pipeline import around, best_footprint, footprint_indexes, rerank_by_structure
from model_backend.locate.query import embed_photo
from model_backend.locate.structure import DEFAULT_STRUCTURE
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
    given_m: float | None = None
    """The footprint the search was given (None: the true one); hits are still judged at the true one."""
    chosen_m: list[float] = field(default_factory=list)
    """The footprint the search chose for each view."""
    hit1_embedding: float | None = None
    """Top-1 of the embedding's own order, before the structure re-rank (None: the re-rank did not run)."""
    structure_s: float = 0.0
    """Mean seconds of the structure re-rank per view."""

    def to_dict(self) -> dict:
        out = {"raster": Path(self.raster).name, "n": self.n, "footprint_m": self.footprint_m,
               "top1": round(self.hit1, 4), "top5": round(self.hit5, 4),
               "median_error_m": round(self.median_error_m, 2)}
        if self.hit1_embedding is not None:
            out.update(top1_embedding=round(self.hit1_embedding, 4), structure_s=round(self.structure_s, 3))
        if self.given_m is not None:
            out.update(given_m=round(self.given_m, 2),
                       chosen_m_median=round(float(np.median(self.chosen_m)), 2) if self.chosen_m else None)
        return out


def synthetic_localisation(raster: str, n_views: int, footprint_m: float, seed: int, *,
                           embedder: EmbeddingModel, cache_dir: str | None = None,
                           query: QueryConfig = QueryConfig(), map_raster: str | None = None,
                           given_factor: float | None = None, **view_kw) -> LocalisationReport:
    """Views of `raster` at `footprint_m` located on `map_raster` (default: the same raster) through the
    production footprint search (`locate.pipeline.best_footprint`: the sizes around the given one that
    `query.footprint_tolerance` allows). `given_factor`: the footprint given is the true one times this
    (a wrong guess); None gives the true one."""
    map_path = map_raster or raster
    info = open_raster(map_path)
    given = footprint_m * (given_factor or 1.0)
    sizes = around(round(given, 2), query.footprint_tolerance, info)
    indexes = footprint_indexes(map_path, sizes, tiling=TilingConfig(footprint_m=given), model=ModelConfig(),
                                embedder=embedder, cache_dir=cache_dir)
    views = make_views(raster, n_views, footprint_m, seed, **view_kw)
    hit1 = hit5 = hit1_emb = 0
    errors: list[float] = []
    chosen: list[float] = []
    secs = 0.0
    for v in views:
        q = embed_photo(embedder, v.image, query.rotations)
        found = best_footprint(indexes, q)
        cands = select_candidates(found.scores, max(5, DEFAULT_STRUCTURE.top_k if query.structure else 0),
                                  query.nms_iou)
        if query.structure and cands:
            first = cands[0]
            hit1_emb += bool(ground_distance_m(info.crs_wkt, np.array([first.x]), np.array([first.y]),
                                               np.array([v.spec.cx]), np.array([v.spec.cy]))[0] <= footprint_m)
            cands, s = rerank_by_structure(info, v.image, cands, found.footprint_m, given, query, None,
                                           found.scores.spread())
            secs += s
        cands = cands[:5]
        xs = np.array([c.x for c in cands])
        ys = np.array([c.y for c in cands])
        d = ground_distance_m(info.crs_wkt, xs, ys, np.full_like(xs, v.spec.cx), np.full_like(ys, v.spec.cy))
        errors.append(float(d[0]))
        chosen.append(found.footprint_m)
        hit1 += bool(d[0] <= footprint_m)
        hit5 += bool((d <= footprint_m).any())
    n = len(views)
    return LocalisationReport(raster, n, footprint_m, hit1 / n, hit5 / n, float(np.median(errors)), errors,
                              given_m=None if given_factor is None else given, chosen_m=chosen,
                              hit1_embedding=hit1_emb / n if query.structure else None,
                              structure_s=secs / n if query.structure else 0.0)


# ---------------------------------------------------------------- geometric verification

def footprint_iou(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """IoU of two footprint polygons in the same CRS (0 when either is degenerate)."""
    from shapely.geometry import Polygon

    pa, pb = Polygon(a), Polygon(b)
    if not (pa.is_valid and pb.is_valid) or pa.area <= 0 or pb.area <= 0:
        return 0.0
    return float(pa.intersection(pb).area / pa.union(pb).area)

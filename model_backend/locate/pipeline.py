"""The main job: where on this raster was this photo taken?

One function used by the CLI, the plugin's task and the Processing algorithms alike, so what
an analyst sees in QGIS is exactly what a script gets headless.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig
from model_backend.core.errors import Cancelled, InputError
from model_backend.core.requests import LocateRequest
from model_backend.geo.exif import load_photo, read_priors
from model_backend.geo.geodesy import ground_distance
from model_backend.geo.raster import RasterInfo, open_raster
from model_backend.geo.tiling import MIN_TILE_PX
from model_backend.index.build import CancelFn, ProgressFn, build_index
from model_backend.index.store import TileIndex
from model_backend.locate.candidates import Candidate, select_candidates
from model_backend.locate.drape import drape_photo
from model_backend.locate.export import write_geojson, write_gpkg
from model_backend.locate.heatmap import write_heatmap
from model_backend.locate.outputs import OUTPUT_SUFFIXES, output_set
from model_backend.locate.priors import gps_disagrees, gps_xy, nadir_enough
from model_backend.locate.query import photo_queries, score_tiles
from model_backend.locate.scores import TileScores
from model_backend.locate.structure import DEFAULT_STRUCTURE, StructureConfig, structure_rerank
from model_backend.locate.verify import DEFAULT_VERIFY, VerifyConfig, verify_candidates
from model_backend.nn.embedder import EmbeddingModel

__all__ = ["Candidate", "LocateResult", "build_index", "locate_photo", "choose_footprints"]

log = logging.getLogger(__name__)


@dataclass
class LocateResult:
    photo: str
    heatmap_path: str
    geojson_path: str
    gpkg_path: str
    crs_wkt: str
    footprint_m: float
    footprint_source: str
    """'user', 'exif' or 'scale search': how footprint_m was chosen."""
    candidates: list[Candidate]
    seconds: float
    index_dir: str
    model_sha256: str
    footprint_given_m: float | None = None
    """The size typed or read from EXIF, around which footprint_m was searched (None: none was given)."""
    footprints_tried: list[tuple[float, float]] = field(default_factory=list)
    """Every footprint searched, with its best tile score: the evidence for footprint_m."""
    index_dirs: list[str] = field(default_factory=list)
    """The index of every footprint searched (index_dir is the chosen one's): a cache limit keeps them all."""
    extra: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    """The result-level match properties (photo, footprint, model, GPS check) every output carries."""
    scores: TileScores | None = field(default=None, repr=False)
    """Every tile's score at the chosen footprint (what a flight's track chooses among); not exported."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def footprint_note(self) -> str:
        """The footprint used and why, for a person: "31 m (40 m typed; best of 30.77, 40, 52 m)"."""
        word = {"user": "typed", "exif": "from EXIF"}.get(self.footprint_source)
        if word is None or self.footprint_given_m is None:
            return f"{self.footprint_m:g} m ({self.footprint_source})"
        if len(self.footprints_tried) <= 1:
            return f"{self.footprint_m:g} m ({word})"
        sizes = ", ".join(f"{f:g}" for f, _ in self.footprints_tried)
        if abs(self.footprint_m - self.footprint_given_m) < 0.01:
            return f"{self.footprint_m:g} m ({word}; best of {sizes} m)"
        return f"{self.footprint_m:g} m ({self.footprint_given_m:g} m {word}; best of {sizes} m)"

    def json_line(self) -> dict[str, Any]:
        b = self.best
        return {
            "photo": self.photo, "best_lon": round(b.lon, 8), "best_lat": round(b.lat, 8),
            "best_x": round(b.x, 3), "best_y": round(b.y, 3), "score": round(b.score, 5),
            "seconds": round(self.seconds, 3), "footprint_m": round(self.footprint_m, 2),
            "footprint_source": self.footprint_source,
            "footprint_given_m": None if self.footprint_given_m is None else round(self.footprint_given_m, 2),
            "footprints_tried": [[round(f, 2), round(s, 5)] for f, s in self.footprints_tried],
            "heatmap": self.heatmap_path,
            "geojson": self.geojson_path, "gpkg": self.gpkg_path, "candidates": len(self.candidates),
            "verified": bool(b.verified), "confidence": None if b.confidence is None else round(b.confidence, 4),
            "footprint_wkt": "POLYGON ((" + ", ".join(f"{x:.3f} {y:.3f}" for x, y, *_ in b.polygon) + "))",
            "heading_deg": b.heading_deg, "inliers": b.inliers,
            "structure": b.structure,
            **{k: v for k, v in self.extra.items() if k.startswith(("gps_", "verify_", "structure_", "draped"))},
        }


def footprint_limits(info: RasterInfo) -> tuple[float, float]:
    """The smallest and largest footprints this raster can hold (MIN_TILE_PX pixels; 95 % of its short side)."""
    return MIN_TILE_PX * max(info.gsd_x_m, info.gsd_y_m), 0.95 * min(info.width_m, info.height_m)


def around(given: float, tolerance: float, info: RasterInfo) -> list[float]:
    """The sizes searched for a given footprint: given/(1+t), given, given*(1+t), those the raster can hold.

    The given size itself always stays, so a size the raster cannot hold fails in make_grid with its reason.
    """
    if tolerance <= 0:
        return [given]
    smallest, limit = footprint_limits(info)
    near = {round(given / (1.0 + tolerance), 2), round(given * (1.0 + tolerance), 2)}
    return sorted({given} | {fp for fp in near if smallest <= fp <= limit})


def choose_footprints(info: RasterInfo, photo: str, tiling: TilingConfig, query: QueryConfig
                      ) -> tuple[list[float], str, float | None]:
    """The footprints to search, where they come from, and the size given (None when none was).

    The user's size, else EXIF's, each with the sizes around it that `query.footprint_tolerance`
    allows; else (no size known) a wider ladder around the tiling's size (`query.scale_search`).
    """
    if query.footprint_m:
        return around(query.footprint_m, query.footprint_tolerance, info), "user", query.footprint_m
    priors = read_priors(photo)
    exif_fp = priors.ground_short_side_m()
    smallest, limit = footprint_limits(info)
    if exif_fp and smallest <= exif_fp <= limit:
        return around(round(exif_fp, 2), query.footprint_tolerance, info), "exif", exif_fp
    if exif_fp:  # a prior this raster cannot hold is ignored, not fatal: the scale search still runs
        log.warning("%s: its EXIF footprint (%.0f m) does not fit this raster; searching scales instead",
                    Path(photo).name, exif_fp)
    base = min(tiling.footprint_m, limit / max(query.scale_search))
    ladder = sorted({round(min(base * s, limit), 2) for s in query.scale_search})
    # A coarse raster cannot hold the ladder's small end (a 36 m tile is 7 pixels at 5 m): search the
    # sizes it can hold; when none can, the user's size stays and make_grid says why.
    usable = [fp for fp in ladder if fp >= smallest]
    return (usable or [tiling.footprint_m]), "scale search", None


@dataclass
class FootprintSearch:
    """The footprint whose index matched the photo best, with its index and scores; `tried` lists
    every size searched with its best score (what the CLI's -v log and the bench report)."""

    footprint_m: float
    index: TileIndex
    scores: TileScores
    tried: list[tuple[float, float]]
    folders: list[str]
    """The index folder of every size searched."""


def footprint_indexes(raster: str, footprints: list[float], *, tiling: TilingConfig, model: ModelConfig,
                      embedder: EmbeddingModel, cache_dir: str | None = None, progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> list[TileIndex]:
    """The index of every size (built once per raster, size and model, then reused from the cache)."""
    indexes = []
    for i, fp in enumerate(footprints):
        def sub(f: float, msg: str, i: int = i, fp: float = fp) -> None:
            if progress:  # with several sizes say which one is being indexed
                label = f"Footprint {fp:g} m ({i + 1} of {len(footprints)}): " if len(footprints) > 1 else ""
                progress((i + f) / len(footprints), label + msg)

        indexes.append(build_index(raster, replace(tiling, footprint_m=fp), model, cache_dir=cache_dir,
                                   progress=sub, cancel=cancel, embedder=embedder))
        if cancel and cancel():
            raise Cancelled()
    return indexes


def best_footprint(indexes: list[TileIndex], queries: np.ndarray, *,
                   near: tuple[tuple[float, float], float] | None = None,
                   near_error: str = "No tile lies near the photo's GPS position.") -> FootprintSearch:
    """Score the photo against the index of every size and keep the size whose best tile scores highest:
    a photo matches tiles of its own ground size best, so the best score also points at the right size
    (measured: bench part `footprint`).

    near: ((x, y), radius) in the raster's CRS: score only the tiles that close (InputError `near_error`
    when none is).
    """
    if not indexes:  # choose_footprints always gives one size; an empty list is a bug
        raise RuntimeError("no footprint was searched")
    scored: list[tuple[TileIndex, TileScores]] = []
    for idx in indexes:
        scores = score_tiles(idx, queries)
        if near is not None:
            scores = scores.within(*near)
            if not scores.scored.any():
                raise InputError(near_error)
        log.info("footprint %.1f m: best score %.4f over %d tiles", idx.grid.footprint_m, scores.best, idx.n_tiles)
        scored.append((idx, scores))
    idx, scores = max(scored, key=lambda pair: pair[1].best)  # the first of equals, as before
    tried = [(i.grid.footprint_m, float(sc.best)) for i, sc in scored]
    return FootprintSearch(idx.grid.footprint_m, idx, scores, tried, [str(i.folder) for i in indexes])


def rerank_by_structure(info: RasterInfo, image: np.ndarray, cands: list[Candidate], chosen_m: float,
                        given_m: float | None, query: QueryConfig, yaw_deg: float | None,
                        spread: tuple[float, float] | None = None, cfg: StructureConfig = DEFAULT_STRUCTURE
                        ) -> tuple[list[Candidate], float]:
    """The structure re-rank as locate runs it; (candidates, seconds).

    Sizes are tried around the one given (typed or EXIF) over its whole tolerance and beyond its top
    (`StructureConfig.upward`), not only around the embedding's choice: across years that choice is often a
    whole step of the search off (bench part `cross_year`); with no size given, around the choice.
    `spread`: the tile scores' `TileScores.spread`, which weighs the embedding's evidence against the
    structure's (None: structure alone)."""
    if given_m and query.footprint_tolerance > 0:
        return structure_rerank(info, image, cands, given_m, yaw_deg, cfg, span=1.0 + query.footprint_tolerance,
                                tile_scores=spread, upward=cfg.upward)
    return structure_rerank(info, image, cands, chosen_m, yaw_deg, cfg, tile_scores=spread)


def locate_photo(raster: str, photo: str, out_dir: str, *, tiling: TilingConfig = TilingConfig(),
                 query: QueryConfig = QueryConfig(), model: ModelConfig = ModelConfig(),
                 cache_dir: str | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, embedder: EmbeddingModel | None = None,
                 verify: bool | None = None, prior_radius_m: float | None = None,
                 verify_config: VerifyConfig = DEFAULT_VERIFY, out_name: str | None = None,
                 structure_config: StructureConfig = DEFAULT_STRUCTURE) -> LocateResult:
    """Locate one photo; writes <name>.heatmap.tif, .matches.geojson and .matches.gpkg in out_dir.

    verify: geometric verification of the top candidates (None: when the photo looks down enough).
    prior_radius_m: score only tiles within this many metres of the photo's GPS position, if it has one.
    out_name: the outputs' name (None: the photo's stem).
    """
    t0 = time.perf_counter()
    info = open_raster(raster)
    image = load_photo(photo)
    if embedder is None and progress:
        progress(0.0, "Loading model…")
    net = embedder or EmbeddingModel.load(model.weights, model.device, model.threads, model.runtime)
    footprints, source, given = choose_footprints(info, photo, tiling, query)
    out = prepare_out_dir(out_dir)

    priors = read_priors(photo)
    gps = gps_xy(priors, info.crs_wkt)
    if prior_radius_m and gps is None:
        log.warning("%s has no GPS position; searching the whole raster.", Path(photo).name)
    do_verify = nadir_enough(priors) if verify is None else verify
    if progress:
        progress(0.02, "Embedding the photo" + ("" if priors.yaw_deg is not None else
                                                 f" at {query.rotations} headings"))
    q = photo_queries(net, image, priors.yaw_deg, query.rotations)

    def searching(f: float, msg: str) -> None:
        if progress:
            progress(0.03 + 0.87 * f, msg)

    near = None
    if prior_radius_m and gps is not None:
        near = (gps, prior_radius_m)
    indexes = footprint_indexes(raster, footprints, tiling=tiling, model=model, embedder=net, cache_dir=cache_dir,
                                progress=searching, cancel=cancel)
    found = best_footprint(
        indexes, q, near=near,
        near_error=f"No tile lies within {prior_radius_m or 0:g} m of {Path(photo).name}'s GPS position; "
                   "is it on this raster? Use a larger --prior-radius-m or none.")
    fp, idx, scores = found.footprint_m, found.index, found.scores
    stem = out_name or Path(photo).stem
    n_cands = max(query.top_k, verify_config.top_k if do_verify else 0,
                  structure_config.top_k if query.structure else 0)
    cands = select_candidates(scores, n_cands, query.nms_iou)
    # How this photo's scores spread over the raster: a flight compares candidates across photos, and the
    # structure re-rank weighs the embedding's evidence, in standard deviations above the median tile.
    spread = scores.spread()
    extra: dict[str, Any] = {"score_median": spread[0], "score_std": spread[1]}
    if query.structure and cands:
        if progress:
            progress(0.90, "Comparing the ground's structure")
        cands, secs = rerank_by_structure(info, image, cands, fp, given, query, priors.yaw_deg, spread,
                                          structure_config)
        extra["structure_seconds"] = round(secs, 3)
    if do_verify and cands:
        if progress:
            progress(0.92, "Verifying candidates")
        cands, secs = verify_candidates(info, image, cands, fp, verify_config)
        extra["verify_seconds"] = round(secs, 3)
    cands = cands[:query.top_k]
    if progress:
        progress(0.95, "Writing heatmap and matches")
    props: dict[str, Any] = {"photo": str(Path(photo).absolute()), "footprint_m": round(fp, 2),
                             "footprint_source": source,
                             "footprint_given_m": None if given is None else round(given, 2),
                             "model": idx.manifest["model"]["weights_name"]}
    if gps is not None and cands:
        dist = ground_distance(info.crs_wkt, *gps, cands[0].x, cands[0].y)
        extra.update(gps_distance_m=round(dist, 1), gps_disagrees=gps_disagrees(dist, fp))
        props.update(gps_distance_m=extra["gps_distance_m"], gps_disagrees=extra["gps_disagrees"])
    with output_set(out, stem, need_bytes=4 * idx.grid.cell_rows * idx.grid.cell_cols) as staged:
        write_heatmap(str(staged / f"{stem}.heatmap.tif"), scores, raster_path=info.path)
        write_geojson(str(staged / f"{stem}.matches.geojson"), cands, info.crs_wkt, props)
        write_gpkg(str(staged / f"{stem}.matches.gpkg"), cands, info.crs_wkt, props)
        if cands and cands[0].verified and cands[0].image_to_crs is not None:
            drape_photo(image, cands[0].image_to_crs, info.crs_wkt, staged / f"{stem}.draped.tif")
            extra["draped"] = str((out / f"{stem}.draped.tif").absolute())
    heat, gj, gp = (str((out / f"{stem}{ext}").absolute()) for ext in OUTPUT_SUFFIXES[:3])
    if progress:
        progress(1.0, "Done")
    return LocateResult(
        photo=str(photo), heatmap_path=heat, geojson_path=gj, gpkg_path=gp, crs_wkt=info.crs_wkt,
        footprint_m=fp, footprint_source=source, footprint_given_m=given, footprints_tried=found.tried,
        index_dirs=found.folders, candidates=cands, seconds=time.perf_counter() - t0,
        index_dir=str(idx.folder), model_sha256=net.sha256, extra=extra, properties=props, scores=scores,
    )


def prepare_out_dir(out_dir: str) -> Path:
    """The output folder, created; InputError with what to do when it cannot be."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}); choose another --out.") from None
    return out


def locate(request: LocateRequest, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
           embedder: EmbeddingModel | None = None) -> LocateResult:
    """The job as every front end asks for it: one LocateRequest, unchanged (see core.requests)."""
    return locate_photo(request.raster, request.photo, request.out_dir, tiling=request.tiling, query=request.query,
                        model=request.model, cache_dir=request.cache_dir, progress=progress, cancel=cancel,
                        embedder=embedder, verify=request.verify, prior_radius_m=request.prior_radius_m,
                        out_name=request.out_name)

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
    extra: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    """The result-level match properties (photo, footprint, model, GPS check) every output carries."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def json_line(self) -> dict[str, Any]:
        b = self.best
        return {
            "photo": self.photo, "best_lon": round(b.lon, 8), "best_lat": round(b.lat, 8),
            "best_x": round(b.x, 3), "best_y": round(b.y, 3), "score": round(b.score, 5),
            "seconds": round(self.seconds, 3), "footprint_m": round(self.footprint_m, 2),
            "footprint_source": self.footprint_source, "heatmap": self.heatmap_path,
            "geojson": self.geojson_path, "gpkg": self.gpkg_path, "candidates": len(self.candidates),
            "verified": bool(b.verified), "confidence": None if b.confidence is None else round(b.confidence, 4),
            "footprint_wkt": "POLYGON ((" + ", ".join(f"{x:.3f} {y:.3f}" for x, y, *_ in b.polygon) + "))",
            "heading_deg": b.heading_deg, "inliers": b.inliers,
            **{k: v for k, v in self.extra.items() if k.startswith(("gps_", "verify_", "draped"))},
        }


def choose_footprints(info: RasterInfo, photo: str, tiling: TilingConfig, query: QueryConfig
                      ) -> tuple[list[float], str]:
    """The footprint(s) to search: the user's, else EXIF-derived, else a small scale ladder."""
    if query.footprint_m:
        return [query.footprint_m], "user"
    priors = read_priors(photo)
    exif_fp = priors.ground_short_side_m()
    limit = 0.95 * min(info.width_m, info.height_m)
    smallest = MIN_TILE_PX * max(info.gsd_x_m, info.gsd_y_m)
    if exif_fp and smallest <= exif_fp <= limit:
        return [exif_fp], "exif"
    if exif_fp:  # a prior this raster cannot hold is ignored, not fatal: the scale search still runs
        log.warning("%s: its EXIF footprint (%.0f m) does not fit this raster; searching scales instead",
                    Path(photo).name, exif_fp)
    base = min(tiling.footprint_m, limit / max(query.scale_search))
    ladder = sorted({round(min(base * s, limit), 2) for s in query.scale_search})
    # A coarse raster cannot hold the ladder's small end (a 36 m tile is 7 pixels at 5 m): search the
    # sizes it can hold; when none can, the user's size stays and make_grid says why.
    usable = [fp for fp in ladder if fp >= smallest]
    return (usable or [tiling.footprint_m]), "scale search"


def locate_photo(raster: str, photo: str, out_dir: str, *, tiling: TilingConfig = TilingConfig(),
                 query: QueryConfig = QueryConfig(), model: ModelConfig = ModelConfig(),
                 cache_dir: str | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, embedder: EmbeddingModel | None = None,
                 verify: bool | None = None, prior_radius_m: float | None = None,
                 verify_config: VerifyConfig = DEFAULT_VERIFY, out_name: str | None = None) -> LocateResult:
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
    footprints, source = choose_footprints(info, photo, tiling, query)
    out = _prepare_out_dir(out_dir)

    priors = read_priors(photo)
    gps = gps_xy(priors, info.crs_wkt)
    if prior_radius_m and gps is None:
        log.warning("%s has no GPS position; searching the whole raster.", Path(photo).name)
    do_verify = nadir_enough(priors) if verify is None else verify
    if progress:
        progress(0.02, "Embedding the photo" + ("" if priors.yaw_deg is not None else
                                                 f" at {query.rotations} headings"))
    q = photo_queries(net, image, priors.yaw_deg, query.rotations)
    best: tuple[float, TileIndex, TileScores] | None = None
    for i, fp in enumerate(footprints):
        def sub(f: float, msg: str, i: int = i, fp: float = fp) -> None:
            if progress:  # with several sizes (scale search) say which one is being searched
                label = f"Footprint {fp:g} m ({i + 1} of {len(footprints)}): " if len(footprints) > 1 else ""
                progress(0.03 + 0.87 * (i + f) / len(footprints), label + msg)

        idx = build_index(raster, replace(tiling, footprint_m=fp), model, cache_dir=cache_dir,
                          progress=sub, cancel=cancel, embedder=net)
        if cancel and cancel():
            raise Cancelled()
        scores = score_tiles(idx, q)
        if prior_radius_m and gps is not None:
            scores = scores.within(gps, prior_radius_m)
            if not scores.scored.any():
                raise InputError(f"No tile lies within {prior_radius_m:g} m of {Path(photo).name}'s GPS position; "
                                 "is it on this raster? Use a larger --prior-radius-m or none.")
        log.info("footprint %.1f m: best score %.4f over %d tiles", fp, scores.best, idx.n_tiles)
        if best is None or scores.best > best[2].best:
            best = (fp, idx, scores)
    if best is None:  # choose_footprints always gives one size; an empty list is a bug
        raise RuntimeError("no footprint was searched")
    fp, idx, scores = best
    stem = out_name or Path(photo).stem
    n_cands = max(query.top_k, verify_config.top_k) if do_verify else query.top_k
    cands = select_candidates(scores, n_cands, query.nms_iou)
    extra: dict[str, Any] = {}
    if do_verify and cands:
        if progress:
            progress(0.92, "Verifying candidates")
        cands, secs = verify_candidates(info, image, cands, fp, verify_config)
        extra["verify_seconds"] = round(secs, 3)
    cands = cands[:query.top_k]
    if progress:
        progress(0.95, "Writing heatmap and matches")
    props: dict[str, Any] = {"photo": str(Path(photo).absolute()), "footprint_m": round(fp, 2),
                             "footprint_source": source, "model": idx.manifest["model"]["weights_name"]}
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
        footprint_m=fp, footprint_source=source, candidates=cands, seconds=time.perf_counter() - t0,
        index_dir=str(idx.folder), model_sha256=net.sha256, extra=extra, properties=props,
    )


def _prepare_out_dir(out_dir: str) -> Path:
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

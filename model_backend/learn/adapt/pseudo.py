"""Pseudo-labels: the analyst's unlabelled photos, placed by the current model where it is sure, as extra pairs.

Ten labels are few; a flight has hundreds of photos of the same area, and the map is all there. Each
unlabelled photo is located the way `locate` does it (the embedding's candidates over the footprint
search, then the structure re-rank, `locate.structure`, which places the photo by the shape of the
ground and finds its heading and size), and the placement becomes a training pair when it is sure:
its structure score is high and clearly above the next distinct place. Such a pair trains the model
like a label (CDIS) but never judges it: the keep-or-reject check (`crossfit`) ranks only the
analyst's own labels, so a wrong pseudo-label can make the adapted model worse but cannot make the
check say it is better.

Cost: one locate per photo, ~1.5-2 s on two cores, bounded by `PseudoConfig.max_photos` and
`budget_s` so that adaptation stays within its five minutes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_backend.core.config import QueryConfig
from model_backend.core.errors import Cancelled, CdiktError
from model_backend.geo.exif import load_photo, read_priors
from model_backend.geo.geodesy import metres_per_unit
from model_backend.geo.raster import RasterInfo
from model_backend.index.build import CancelFn, ProgressFn
from model_backend.index.store import TileIndex
from model_backend.learn.labels import ResolvedLabel
from model_backend.locate.candidates import Candidate, select_candidates
from model_backend.locate.pipeline import best_footprint, rerank_by_structure
from model_backend.locate.query import photo_queries
from model_backend.locate.structure import StructureConfig
from model_backend.nn.embedder import EmbeddingModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoConfig:
    """When an unlabelled photo's placement is trusted as a training pair."""

    max_photos: int = 40
    """Photos located at most (a seeded sample of a larger folder)."""
    budget_s: float = 75.0
    """Seconds spent locating at most; the photos not reached are treated as not placed."""
    min_structure: float = 0.2
    """Structure score (normalised correlation of edge orientations) the first place needs."""
    min_margin: float = 0.05
    """...and by how much it must beat the next distinct place."""
    structure: StructureConfig = field(default_factory=lambda: StructureConfig(upward=1.0, size_bias=0.0))
    """The re-rank as it was when the thresholds above were set (sizes within the footprint's tolerance,
    unweighed): about half the cost of locate's, whose wider ladder would push 40 photos past the budget,
    and whose weighed scores the thresholds were not calibrated on."""


DEFAULT_PSEUDO = PseudoConfig()


@dataclass
class PseudoResult:
    """The pairs made and what became of each photo tried (for the result's evidence)."""

    labels: list[ResolvedLabel]
    tried: int
    seconds: float
    scores: list[tuple[str, float, float]]
    """(photo name, first structure score, margin over the second) of every photo tried."""

    def to_dict(self) -> dict[str, object]:
        return {"pseudo_pairs": len(self.labels), "pseudo_tried": self.tried,
                "pseudo_seconds": round(self.seconds, 1)}


def pseudo_labels(info: RasterInfo, photos: list[str], net: EmbeddingModel, indexes: list[TileIndex],
                  footprint_m: float, cfg: PseudoConfig = DEFAULT_PSEUDO, *, query: QueryConfig = QueryConfig(),
                  seed: int = 0, progress: ProgressFn | None = None, cancel: CancelFn | None = None
                  ) -> PseudoResult:
    """Sure placements of `photos` on the raster under the current model (`net`, its `indexes`), as labels.

    `footprint_m`: the size the labels gave (the structure search spans its tolerance around it).
    An unreadable photo is skipped with a warning; `cancel` raises Cancelled."""
    t0 = time.perf_counter()
    order = list(np.random.default_rng([seed, 7]).permutation(len(photos))[:cfg.max_photos])
    made: list[ResolvedLabel] = []
    scores: list[tuple[str, float, float]] = []
    tried = 0
    for n, i in enumerate(order):
        if cancel and cancel():
            raise Cancelled("cancelled")
        if time.perf_counter() - t0 > cfg.budget_s:
            log.info("Pseudo-labels: time budget reached after %d of %d photos", n, len(order))
            break
        path = photos[int(i)]
        try:
            image = load_photo(path)
            yaw = read_priors(path).yaw_deg
        except CdiktError as exc:
            log.warning("Skipping unlabelled photo %s: %s", path, exc)
            continue
        tried += 1
        found = best_footprint(indexes, photo_queries(net, image, yaw, query.rotations))
        cands = select_candidates(found.scores, cfg.structure.top_k, query.nms_iou)
        if not cands:
            continue
        cands, _ = rerank_by_structure(info, image, cands, found.footprint_m, footprint_m, query, yaw,
                                       found.scores.spread(), cfg.structure)
        best = cands[0]
        if best.structure is None or best.tile_x is None:  # the re-rank could not place its first candidate
            continue
        second = max((c.structure for c in cands[1:] if c.structure is not None), default=0.0)
        scores.append((Path(path).name, best.structure, best.structure - second))
        if best.structure >= cfg.min_structure and best.structure - second >= cfg.min_margin:
            made.append(_as_label(best, path, info.crs_wkt, -(len(made) + 1)))
        if progress:
            progress((n + 1) / len(order), f"Placed {len(made)} of {n + 1} unlabelled photos with confidence")
    return PseudoResult(made, tried, time.perf_counter() - t0, scores)


def _as_label(c: Candidate, path: str, crs_wkt: str, index: int) -> ResolvedLabel:
    """A placed candidate as a label: its centre, its rectangle's short side and the direction of its top edge
    (`structure.footprint_ring` lists bottom-left, bottom-right, top-right, top-left)."""
    ring = [(float(x), float(y)) for x, y in c.polygon]
    mx, my = metres_per_unit(crs_wkt, c.x, c.y)
    (blx, bly), (brx, bry), _, (tlx, tly) = ring[:4]
    up = ((tlx - blx) * mx, (tly - bly) * my)
    across = math.hypot((brx - blx) * mx, (bry - bly) * my)
    heading = math.degrees(math.atan2(up[0], up[1])) % 360.0
    return ResolvedLabel(index=index, photo=Path(path), cx=float(c.x), cy=float(c.y),
                         side_m=min(math.hypot(*up), across), heading=heading, ring=ring)

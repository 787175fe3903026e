"""Keep or reject an adapted model on evidence from every labelled pair, not from three of them.

With ten labels, holding three out to judge the model that trained on seven is a coin toss: three
ranks decide, and one lucky photo let a harmful model through. Here every labelled pair is judged
by a model that never saw it (k-fold cross-fitting: each fold's pairs are ranked by a head trained
on the other folds), and the decision compares, pair by pair, that rank with the current model's.
The model finally written is trained on all the pairs; the folds estimate what the procedure does
to photos it did not train on, which is the question the analyst asks.

It stays cheap because only the head is trained (see `data.split_backbone`): the frozen trunk runs
once per raster tile and once per photo heading, and each fold only re-runs the head. A raster with
more than `MAX_TILES` tiles is judged on a seeded sample of them (always keeping the tiles around
each labelled place), the same sample for the current model and for the folds, so both ranks count
against the same competitors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model_backend.core.config import QueryConfig
from model_backend.core.errors import Cancelled
from model_backend.geo.geodesy import ground_distance_m
from model_backend.geo.reader import StripReader, compute_stretch
from model_backend.geo.tiling import TileGrid
from model_backend.index.build import CancelFn, ProgressFn, tile_batches
from model_backend.index.store import TileIndex
from model_backend.learn.adapt.train import AdaptViews, TrainConfig, train_head
from model_backend.learn.labels import ResolvedLabel
from model_backend.locate.candidates import select_candidates
from model_backend.locate.scores import TileScores
from model_backend.nn.cdiktnet import CDIKTNet
from model_backend.nn.runtime import scale_shift

MAX_TILES = 6000
"""Tiles the folds rank against; beyond it a seeded sample (trunk maps cost ~31 KB each in fp16)."""
MAX_FOLDS = 5


@dataclass
class Decision:
    """Whether the adapted model should replace the current one, and the evidence, pair by pair."""

    photos: list[str]
    before: list[int]
    """Rank of each labelled pair's true place under the current model (1 = best candidate)."""
    after: list[int]
    """Its rank under a model adapted without it (cross-fitted)."""
    folds: int
    tiles: int
    """Tiles the ranks count against (all of the raster's, or the sample)."""
    rule: str = field(default="more pairs at #1 after than before, and more pairs ranked better than worse")

    @property
    def better(self) -> int:
        return sum(a < b for a, b in zip(self.after, self.before))

    @property
    def worse(self) -> int:
        return sum(a > b for a, b in zip(self.after, self.before))

    @property
    def use(self) -> bool:
        """The margin: strictly more pairs at #1, and strictly more pairs improved than worsened. A tie
        keeps the current model: an analyst loses nothing by waiting for more labels."""
        top_before = sum(r == 1 for r in self.before)
        top_after = sum(r == 1 for r in self.after)
        return top_after > top_before and self.better > self.worse

    def to_dict(self) -> dict[str, Any]:
        return {"use": self.use, "rule": self.rule, "folds": self.folds, "tiles": self.tiles,
                "better": self.better, "worse": self.worse,
                "pairs": [{"photo": p, "rank_before": b, "rank_after": a}
                          for p, b, a in zip(self.photos, self.before, self.after)]}


def fold_of(n: int, seed: int) -> np.ndarray:
    """Fold number of each of `n` pairs: min(n, MAX_FOLDS) folds of near-equal size, seeded."""
    k = min(n, MAX_FOLDS)
    order = np.random.default_rng([seed, 5]).permutation(n)
    folds = np.empty(n, np.int64)
    folds[order] = np.arange(n) % k
    return folds


def _tile_subset(idx: TileIndex, labels: list[ResolvedLabel], seed: int) -> np.ndarray:
    """Positions (rows of the index) the ranks count against: all, or a sample keeping the labels' places."""
    n = idx.n_tiles
    if n <= MAX_TILES:
        return np.arange(n)
    x, y = idx.grid.centres(idx.cols, idx.rows)
    near = np.zeros(n, bool)
    for lb in labels:
        d = ground_distance_m(idx.grid.crs_wkt, x, y, np.full(n, lb.cx), np.full(n, lb.cy))
        near |= d <= 3 * lb.side_m
    rest = np.flatnonzero(~near)
    take = np.random.default_rng([seed, 6]).choice(rest, max(0, min(rest.size, MAX_TILES - int(near.sum()))),
                                                   replace=False)
    return np.sort(np.concatenate([np.flatnonzero(near), take]))


def true_rank(scores: TileScores, lb: ResolvedLabel, max_rank: int) -> int:
    """Where the label's true place comes among the distinct candidates (the production NMS), 1 = first:
    the first candidate whose centre lies within one footprint of the label's; max_rank + 1 if none."""
    cands = select_candidates(scores, max_rank, QueryConfig().nms_iou)
    if not cands:
        return max_rank + 1
    d = ground_distance_m(scores.grid.crs_wkt, np.array([c.x for c in cands]), np.array([c.y for c in cands]),
                          np.full(len(cands), lb.cx), np.full(len(cands), lb.cy))
    hit = np.flatnonzero(d <= lb.side_m)
    return int(hit[0]) + 1 if hit.size else max_rank + 1


def _rank(grid: TileGrid, cols: np.ndarray, rows: np.ndarray, tile_emb: np.ndarray, queries: np.ndarray,
          lb: ResolvedLabel, max_rank: int) -> int:
    """`true_rank` against a set of tiles given by their embeddings (the check's sample)."""
    sims = queries.astype(np.float32) @ tile_emb.astype(np.float32).T
    return true_rank(TileScores(grid, cols, rows, sims.max(axis=0), sims.argmax(axis=0)), lb, max_rank)


@torch.no_grad()
def _tile_maps(views: AdaptViews, model: CDIKTNet, raster: str, idx: TileIndex, keep: np.ndarray,
               cancel: CancelFn | None) -> torch.Tensor:
    """Trunk maps (fp16) of the index's tiles at `keep`, read exactly as the index read them."""
    from model_backend.geo.raster import open_raster

    info = open_raster(raster)
    wanted = {(int(c), int(r)) for c, r in zip(idx.cols[keep], idx.rows[keep])}
    maps: dict[tuple[int, int], torch.Tensor] = {}
    size = model.input_size
    with StripReader(info, idx.grid, size, compute_stretch(info)) as reader:
        for cols, rows, images in tile_batches(reader, None, 0, idx.grid.n_rows, 64, 0.0, raw=True):  # type: ignore[arg-type]
            if cancel and cancel():
                raise Cancelled("cancelled")
            pick = [i for i, (c, r) in enumerate(zip(cols, rows)) if (int(c), int(r)) in wanted]
            if not pick:
                continue
            out = views.split.trunk(_normalised(model, torch.from_numpy(np.ascontiguousarray(images[pick])))).half()
            for j, i in enumerate(pick):
                maps[(int(cols[i]), int(rows[i]))] = out[j]
    return torch.stack([maps[(int(c), int(r))] for c, r in zip(idx.cols[keep], idx.rows[keep])])


@torch.no_grad()
def _photo_maps(views: AdaptViews, model: CDIKTNet, crops: np.ndarray) -> torch.Tensor:
    """Trunk maps of a photo's query crops (`locate.query.query_crops`, (R, S, S, 3) uint8)."""
    return views.split.trunk(_normalised(model, torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2))
                             ).half()


def _normalised(model: CDIKTNet, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 → the backbone's normalised float input, as the index's embedder feeds it."""
    scale, shift = (torch.from_numpy(v).view(1, 3, 1, 1) for v in scale_shift(model.backbone.mean, model.backbone.std))
    return images.float() * scale + shift


@torch.no_grad()
def _embed(views: AdaptViews, maps: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([F.normalize(views.split.head(maps[i:i + batch].float()), dim=1)
                      for i in range(0, len(maps), batch)]).numpy()


def cross_fit(views: AdaptViews, model: CDIKTNet, raster: str, labels: list[ResolvedLabel], before_index: TileIndex,
              before_queries: list[np.ndarray], crops: list[np.ndarray], cfg: TrainConfig, epochs: int, seed: int,
              max_rank: int, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Decision:
    """Rank every labelled pair under the current model and under a head trained without its fold.

    `views` and `model` are the prepared views and the (look-folded, untrained-head) model; both are
    left as they came. `before_index` / `before_queries`: the current model's index of the raster and
    each label's query embeddings; `crops`: each label's query crops (`query_crops`), which made them.
    """
    keep = _tile_subset(before_index, labels, seed)
    grid, cols, rows = before_index.grid, before_index.cols[keep], before_index.rows[keep]
    before_emb = np.asarray(before_index.embeddings[keep], np.float32)
    before = [_rank(grid, cols, rows, before_emb, q, lb, max_rank) for q, lb in zip(before_queries, labels)]
    if progress:
        progress(0.05, f"Reading {len(keep)} tiles for the check")
    tiles = _tile_maps(views, model, raster, before_index, keep, cancel)
    photos = [_photo_maps(views, model, c) for c in crops]
    folds = fold_of(len(labels), seed)
    start = copy.deepcopy(views.split.trained.state_dict())
    start_scale = model.logit_scale.detach().clone()
    after = [0] * len(labels)
    k = int(folds.max()) + 1
    try:
        for f in range(k):
            held = np.flatnonzero(folds == f)
            views.split.trained.load_state_dict(start)
            with torch.no_grad():
                model.logit_scale.copy_(start_scale)
            train_head(views.without(held.tolist()), model, cfg, epochs, seed + 1000 * (f + 1), cancel=cancel)
            tile_emb = _embed(views, tiles)
            for i in held:
                after[i] = _rank(grid, cols, rows, tile_emb, _embed(views, photos[i]), labels[i], max_rank)
            if progress:
                progress(0.1 + 0.9 * (f + 1) / k, f"Checked fold {f + 1} of {k}")
    finally:  # the caller trains the final head from the same start
        views.split.trained.load_state_dict(start)
        with torch.no_grad():
            model.logit_scale.copy_(start_scale)
    return Decision([lb.photo.name for lb in labels], before, after, k, len(keep))

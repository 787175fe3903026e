"""The adaptation's training loop: CDIS on the labelled pairs, CDTS on everything unlabelled, head only.

Each epoch, as CDTS prescribes, every cached view is embedded, pseudo labels are made per view
(k-reciprocal Jaccard + DBSCAN, `make_pseudo_labels`, dual path) with the labelled pairs as
fixed anchors, and cluster memories are built (`CDTSMemory`); each step then adds
- CDIS: symmetric InfoNCE between one augmented view of every training photo and of its raster
  crop (`CDISLoss`; its classifier and token-alignment terms are off: with ten pairs there are no
  location classes beyond the pairs themselves, and the alignment head would cost more than the
  part being trained), and
- CDTS: the memory loss on a batch of each view; through the anchors, a labelled photo is also
  pulled to its tile's cluster against every other raster cluster — hundreds of negatives where
  the pair batch alone has nine;
- optionally an anchor term keeping raster views where the starting model put them.
Only the head's parameters (and InfoNCE's temperature) move; BatchNorm keeps its statistics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model_backend.core.errors import Cancelled, CdiktError
from model_backend.geo.exif import load_photo
from model_backend.geo.geodesy import metres_per_unit
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import make_grid
from model_backend.learn.adapt.data import (
    TrunkHead,
    ViewAugment,
    ViewMaker,
    photo_north_up,
    raster_tile,
    split_backbone,
    trunk_maps,
)
from model_backend.learn.datasets.transforms import to_model_input
from model_backend.learn.labels import ResolvedLabel
from model_backend.locate.query import rotation_crops
from model_backend.nn.cdiktnet import (
    CDIKTNet,
    CDISLoss,
    CDISLossConfig,
    CDISOutput,
    CDTSConfig,
    CDTSMemory,
    make_pseudo_labels,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
_CANCELLED = "Adaptation cancelled; nothing was written and the active model is unchanged."


@dataclass(frozen=True)
class TrainConfig:
    """What is trained and on how much; defaults keep a CPU run to a few minutes."""

    part: str = "last_block"
    """'last_block' or 'last_stage' (see adapt_data.split_backbone); on the NAIP benchmark the last block
    alone did as well as the whole last stage at half the cost."""
    views_per_pair: int = 16
    unlabelled_tiles: int = 150
    views_per_tile: int = 4
    views_per_photo: int = 4
    steps_per_epoch: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-4
    cdts_weight: float = 0.25
    cdts_batch: int = 32
    domain_weight: float = 0.0
    """Pull the mean photo embedding onto the mean raster embedding (over each step's batches): one
    shared head can only do that by ignoring what tells the two domains apart (season, sensor), a
    global property that ten pairs cannot teach place by place."""
    styled_views_per_tile: int = 2
    """Photo-styled copies of each unlabelled tile, paired with the tile (`ViewMaker.styled_pair`)."""
    styled_per_step: int = 22
    """Styled pairs added to each step's InfoNCE batch beside the labelled pairs."""
    anchor_weight: float = 1.0
    """Pull raster views back to where the starting model put them (1 − cosine): the map side already
    works tile-to-tile, so the photos should move into its space rather than both drifting."""
    cdts: CDTSConfig = field(default_factory=lambda: CDTSConfig(
        k1=20, k2=6, eps_drone=0.5, eps_satellite=0.5, min_samples=2, momentum_first_epoch=0.2, momentum=0.2,
        shared_from_epoch=1 << 30))
    """DMNIL's recipe scaled to a few hundred views: smaller neighbourhoods, looser eps, pairs of views
    may form a cluster; the dual path throughout (ten photos are too few to vote satellite labels)."""


@dataclass
class AdaptViews:
    """Trunk maps of every view and what is known about them (location id per view, -1 unknown)."""

    split: TrunkHead
    drone: torch.Tensor
    sat: torch.Tensor
    pair_drone: np.ndarray
    """(pairs, views_per_pair) rows of `drone` holding each pair's photo views."""
    pair_sat: np.ndarray
    drone_locations: np.ndarray
    sat_locations: np.ndarray
    styled_drone: torch.Tensor | None = None
    """Photo-styled unlabelled tiles (`ViewMaker.styled_pair`), row i paired with `styled_sat` row i."""
    styled_sat: torch.Tensor | None = None
    n_styled: int = 0

    @property
    def trained_part(self) -> str:
        return self.split.description

    def without(self, pairs: list[int]) -> AdaptViews:
        """The views with those labelled pairs' photo and raster views removed (a cross-fitting fold:
        nothing of them may reach training, not even as a location id in CDTS)."""
        gone = set(pairs)
        kept = [i for i in range(len(self.pair_drone)) if i not in gone]
        new_id = {old: new for new, old in enumerate(kept)}

        def rows(locations: np.ndarray) -> np.ndarray:
            return np.flatnonzero(~np.isin(locations, list(gone)))

        def remap(locations: np.ndarray, keep: np.ndarray) -> np.ndarray:
            return np.array([new_id.get(int(v), -1) if v >= 0 else -1 for v in locations[keep]], np.int64)

        d_keep, s_keep = rows(self.drone_locations), rows(self.sat_locations)
        d_pos = np.full(len(self.drone_locations), -1)
        d_pos[d_keep] = np.arange(d_keep.size)
        s_pos = np.full(len(self.sat_locations), -1)
        s_pos[s_keep] = np.arange(s_keep.size)
        return replace(self, drone=self.drone[torch.as_tensor(d_keep)], sat=self.sat[torch.as_tensor(s_keep)],
                       pair_drone=d_pos[self.pair_drone[kept]], pair_sat=s_pos[self.pair_sat[kept]],
                       drone_locations=remap(self.drone_locations, d_keep),
                       sat_locations=remap(self.sat_locations, s_keep))


def sample_tile_centres(raster: str, footprint_m: float, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """`n` centres of the raster's own tile grid (the tiles the index will hold), drawn at random."""
    from model_backend.core.config import TilingConfig

    info = open_raster(raster)
    grid = make_grid(info, TilingConfig(footprint_m=footprint_m))
    cols, rows = np.meshgrid(np.arange(grid.n_cols), np.arange(grid.n_rows))
    pick = rng.permutation(cols.size)[:n]
    xs, ys = grid.centres(cols.ravel()[pick], rows.ravel()[pick])
    return list(zip(xs.tolist(), ys.tolist()))


@torch.no_grad()
def _best_heading(net, photo: np.ndarray, tile: np.ndarray, rotations: int = 8) -> float:
    """For a label without heading: the rotation at which the current model matches the photo to its tile."""
    crops = rotation_crops(photo, rotations, net.meta.input_size)
    q = net.embed(net.normalise(crops))
    t = net.embed(net.normalise(tile[None]))
    best = int(np.argmax(q @ t[0]))
    return float((-360.0 * best / rotations) % 360.0)


def build_views(model: CDIKTNet, raster: str, train: list[ResolvedLabel], photos: list[str], cfg: TrainConfig,
                aug: ViewAugment, seed: int, net, *, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None) -> AdaptViews:
    """Augmented views of the pairs, of unlabelled tiles and photos, through the frozen trunk once."""
    rng = np.random.default_rng([seed, 1])
    split = split_backbone(model.backbone, cfg.part)
    size = model.input_size
    maker = ViewMaker(size, rng, aug)
    crs_wkt = open_raster(raster).crs_wkt
    drone_imgs, sat_imgs, d_loc, s_loc = [], [], [], []
    north_up_photos: list[Image.Image] = []
    for i, lb in enumerate(train):
        if cancel and cancel():
            raise Cancelled(_CANCELLED)
        heading = None
        if lb.heading is None:
            tile, _ = raster_tile(raster, lb.cx, lb.cy, lb.side_m, size)
            heading = _best_heading(net, load_photo(str(lb.photo)), np.asarray(tile))
        photo = photo_north_up(lb, heading)
        north_up_photos.append(photo)
        mx, my = metres_per_unit(crs_wkt, lb.cx, lb.cy)

        def read(dx: float, dy: float, scale: float, lb: ResolvedLabel = lb, mx: float = mx,
                 my: float = my) -> Image.Image:
            return raster_tile(raster, lb.cx + dx * lb.side_m / mx, lb.cy - dy * lb.side_m / my,
                               scale * lb.side_m, size)[0]

        for _ in range(cfg.views_per_pair):
            d, s = maker.sub_pair(photo, read)
            drone_imgs.append(d)
            sat_imgs.append(s)
        d_loc += [i] * cfg.views_per_pair
        s_loc += [i] * cfg.views_per_pair
        if progress:
            progress(0.2 * (i + 1) / len(train), f"Prepared {i + 1} of {len(train)} labelled pairs")
    side = float(np.median([lb.side_m for lb in train]))
    loose = []
    for p in photos:
        if cancel and cancel():
            raise Cancelled(_CANCELLED)
        try:
            img = Image.fromarray(load_photo(p))
        except CdiktError as exc:  # one unreadable unlabelled photo costs its views, not the adaptation
            log.warning("Skipping unlabelled photo %s: %s", p, exc)
            continue
        img.thumbnail((512, 512))
        loose.append(img)
        drone_imgs += [maker.loose_photo(img) for _ in range(cfg.views_per_photo)]
        d_loc += [-1] * cfg.views_per_photo
    looks = [np.asarray(to_model_input(im, size)) for im in [*north_up_photos, *loose]]
    styled_d, styled_s = [], []
    for x, y in sample_tile_centres(raster, side, cfg.unlabelled_tiles, rng):
        tile, valid = raster_tile(raster, x, y, side, size)
        if valid < 0.5:
            continue
        sat_imgs += [maker.tile(tile) for _ in range(cfg.views_per_tile)]
        s_loc += [-1] * cfg.views_per_tile
        for _ in range(cfg.styled_views_per_tile):
            d, s = maker.styled_pair(tile, looks)
            styled_d.append(d)
            styled_s.append(s)
    n_real_d, n_real_s = len(drone_imgs), len(sat_imgs)
    drone_imgs += styled_d
    sat_imgs += styled_s
    total = len(drone_imgs) + len(sat_imgs)

    def step(done: int, offset: int = 0) -> None:
        if progress:
            progress(0.2 + 0.8 * (offset + done) / total, f"Embedding views {offset + done} of {total}")

    drone = trunk_maps(split, drone_imgs, cancel=cancel, progress=step)
    sat = trunk_maps(split, sat_imgs, cancel=cancel, progress=lambda n: step(n, len(drone_imgs)))
    a = cfg.views_per_pair
    idx = np.arange(len(train) * a).reshape(len(train), a)
    styled = np.stack([np.arange(len(styled_d)) + n_real_d, np.arange(len(styled_s)) + n_real_s], axis=1)
    return AdaptViews(split, drone[:n_real_d], sat[:n_real_s], idx, idx.copy(), np.asarray(d_loc),
                      np.asarray(s_loc), styled_drone=drone[n_real_d:], styled_sat=sat[n_real_s:],
                      n_styled=len(styled))


@torch.no_grad()
def _embed_all(split: TrunkHead, maps: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([F.normalize(split.head(maps[i:i + batch].float()), dim=1) for i in range(0, len(maps), batch)])


def train_head(views: AdaptViews, model: CDIKTNet, cfg: TrainConfig, epochs: int, seed: int, *,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> list[dict[str, float]]:
    """Train the head in place; returns one loss record per epoch."""
    split = views.split
    rng = np.random.default_rng([seed, 2])
    params = split.parameters_to_train() + [model.logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, epochs * cfg.steps_per_epoch)
    warm = max(1, total // 10)  # linear warm-up over a tenth, then cosine down (any number of steps, even 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / warm if k < warm else
                                              0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm))))
    cdis = CDISLoss(CDISLossConfig(ce_weight=0.0, alignment_weight=0.0))
    n_pairs, n_views = views.pair_drone.shape
    anchor = _embed_all(split, views.sat) if cfg.anchor_weight > 0 else None
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        split.trained.eval()
        ed, es = _embed_all(split, views.drone), _embed_all(split, views.sat)
        labels = make_pseudo_labels(ed, es, cfg.cdts, shared=cfg.cdts.is_shared(epoch),
                                    drone_locations=views.drone_locations, sat_locations=views.sat_locations)
        memory = CDTSMemory.build(ed, es, labels, cfg.cdts, epoch).train()
        split.train_head()
        sums = {"cdis": 0.0, "cdts": 0.0, "anchor": 0.0, "domain": 0.0}
        for _ in range(cfg.steps_per_epoch):
            if cancel and cancel():
                raise Cancelled(_CANCELLED)
            pick = rng.integers(0, n_views, size=n_pairs)
            rows = np.arange(n_pairs)
            d_maps, s_maps = views.drone[views.pair_drone[rows, pick]], views.sat[views.pair_sat[rows, pick]]
            if views.n_styled and cfg.styled_per_step:
                extra = rng.choice(views.n_styled, min(cfg.styled_per_step, views.n_styled), replace=False)
                d_maps = torch.cat([d_maps, views.styled_drone[extra]])
                s_maps = torch.cat([s_maps, views.styled_sat[extra]])
            b = len(d_maps)
            e = split.head(torch.cat([d_maps, s_maps]).float())
            out = CDISOutput(drone_pooled=e[:b], sat_pooled=e[b:], logit_scale=model.logit_scale.exp())
            loss = cdis(out).total
            sums["cdis"] += float(loss.detach())
            if cfg.cdts_weight > 0 or cfg.anchor_weight > 0 or cfg.domain_weight > 0:
                bs = rng.choice(len(views.sat), min(cfg.cdts_batch, len(views.sat)), replace=False)
                fs = split.head(views.sat[bs].float())
                bd = rng.choice(len(views.drone), min(cfg.cdts_batch, len(views.drone)), replace=False)
                fd = split.head(views.drone[bd].float())
            if cfg.domain_weight > 0:
                gap = (F.normalize(fd, dim=1).mean(dim=0) - F.normalize(fs, dim=1).mean(dim=0)).pow(2).sum()
                loss = loss + cfg.domain_weight * gap
                sums["domain"] += float(gap.detach())
            if cfg.cdts_weight > 0:
                r = memory(fd, torch.as_tensor(labels.drone[bd]), fs, torch.as_tensor(labels.satellite[bs]),
                           torch.as_tensor(labels.drone_cross[bd]), torch.as_tensor(labels.satellite_cross[bs]))
                loss = loss + cfg.cdts_weight * r.total
                sums["cdts"] += float(r.total.detach())
            if cfg.anchor_weight > 0:
                drift = 1 - (F.normalize(fs, dim=1) * anchor[bs]).sum(dim=1).mean()
                loss = loss + cfg.anchor_weight * drift
                sums["anchor"] += float(drift.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 100.0)
            opt.step()
            sched.step()
        rec = {"epoch": epoch, **{k: v / cfg.steps_per_epoch for k, v in sums.items()}, **labels.summary()}
        history.append(rec)
        log.info("adapt epoch %d: %s", epoch, rec)
        if progress:
            progress((epoch + 1) / epochs, f"Adapting: epoch {epoch + 1} of {epochs}, loss {rec['cdis']:.3f}")
    split.trained.eval()
    model.eval()
    return history

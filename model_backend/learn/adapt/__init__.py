"""Few-shot adaptation: a handful of labelled pairs make the model fit the analyst's imagery.

When photos and map differ strongly (another year, season or sensor), the generic model ranks the
true place low. The analyst labels a few photos on the map; `adapt` then
1. ranks every labelled pair's true place among the raster's tiles with the *current* model, through
   the production query path (index, rotation search, distinct candidates);
2. fine-tunes from the current model: CDIS (symmetric InfoNCE, `CDISLoss`) on the pairs (photo ↔
   raster crop at its footprint, or at a part of it) and on unlabelled tiles dressed in the photos'
   colours, and CDTS (`make_pseudo_labels` + `CDTSMemory`, dual path, the labelled pairs as fixed
   anchors) on unlabelled raster tiles and photos, while an anchor term keeps the tiles' embeddings
   near where they were (see adapt_train); on CPU only a light part is trained (see
   `adapt_data.split_backbone`), everything below it runs once per view;
3. decides keep-or-reject by cross-fitting (`crossfit`): each pair is ranked again by a model
   trained without it, and the new model is to be used only when, pair by pair, it is better by a
   margin; the evidence (ranks before and after per pair) goes into the result and the registry;
4. writes a NEW weights file (never overwriting one), trained on all the pairs, and records it.
   Pairs kept out on request (`holdout`, benchmarks) are measured before and after on the written model.
Cancelling at any point writes nothing: the model in use stays what it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_backend.core.atomic import atomic_path
from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig
from model_backend.core.errors import Cancelled, InputError
from model_backend.core.requests import AdaptRequest
from model_backend.geo.exif import load_photo, read_priors
from model_backend.geo.raster import RasterInfo, open_raster
from model_backend.index.build import CancelFn, ProgressFn, build_index
from model_backend.learn.adapt.crossfit import Decision, cross_fit, true_rank
from model_backend.learn.adapt.data import ViewAugment
from model_backend.learn.adapt.look import LOOKS, LookChoice, choose_look, fold_luminance, sees_luminance
from model_backend.learn.adapt.pseudo import PseudoConfig, PseudoResult, pseudo_labels
from model_backend.learn.adapt.train import TrainConfig, build_views, sample_tile_centres, train_head
from model_backend.learn.labels import LabelSet, ResolvedLabel, read_labels, resolve_labels
from model_backend.learn.versions import ModelRegistry
from model_backend.locate.flight.order import list_photos
from model_backend.locate.pipeline import around, best_footprint, footprint_indexes
from model_backend.locate.query import photo_queries, query_crops
from model_backend.nn.cdiktnet import CDIKTNet, save_inference_weights
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.weights import default_weights_path, read_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides an adaptation run; recorded in the result and the registry."""

    epochs: int = 6
    holdout: float = 0.0
    """Share of the labelled pairs kept out of everything, to measure the written model on photos neither it
    nor the keep-or-reject check saw (benchmarks); at most all but 2. The decision itself is cross-fitted
    over the other pairs (`crossfit`), so by default every label trains and every label is evidence."""
    holdout_count: int | None = None
    """Exact number held out instead of `holdout` (benchmarks)."""
    seed: int = 0
    footprint_m: float | None = None
    """Tile footprint of the validation index; None = the labels' median ground size."""
    footprint_tolerance: float = QueryConfig.footprint_tolerance
    """Held-out photos are located as `locate` does: at the sizes around the footprint this allows."""
    rotations: int = 8
    max_rank: int = 50
    """Ranks are counted among this many distinct candidates; a true place not among them gets max_rank + 1."""
    look: str = "auto"
    """'colour', 'luminance' (the adapted model ignores colour, see adapt_look) or 'auto': whichever ranks
    the training pairs better."""
    runtime: str = "auto"
    """Inference engine for indexing and queries (model.ModelConfig.runtime); 'torch' skips the export."""
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: ViewAugment = field(default_factory=ViewAugment)
    unlabelled_cdts: bool = False
    """The unlabelled photos not made pseudo pairs also train without labels (CDTS). Off: measured on the
    cross-year benchmark, CDTS on a flight's photos made adaptation worse (docs/adapt.md, "What did not help")."""
    max_unlabelled: int = 60
    """Of those, at most this many (a seeded sample): a whole flight's folder would cost minutes."""
    pseudo: PseudoConfig | None = field(default_factory=PseudoConfig)
    """Unlabelled photos placed with confidence train as extra pairs (`pseudo`); None: they stay unlabelled."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationFigure:
    """Where the model ranks the true place of each held-out labelled photo (1 = best candidate)."""

    ranks: list[int]
    max_rank: int

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def top1(self) -> float:
        return float(np.mean([r == 1 for r in self.ranks])) if self.ranks else 0.0

    @property
    def top5(self) -> float:
        return float(np.mean([r <= 5 for r in self.ranks])) if self.ranks else 0.0

    @property
    def median_rank(self) -> float:
        return float(np.median(self.ranks)) if self.ranks else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "top1": round(self.top1, 4), "top5": round(self.top5, 4),
                "median_rank": self.median_rank, "ranks": list(self.ranks), "max_rank": self.max_rank}

    def better_or_equal(self, other: ValidationFigure) -> bool:
        """Top-1 first, median rank as the tie-break: what an analyst sees first is #1."""
        return (self.top1, -self.median_rank) >= (other.top1, -other.median_rank)


@dataclass
class AdaptResult:
    out: str
    parent_weights: str | None
    before: ValidationFigure
    after: ValidationFigure
    trained_part: str
    n_train: int
    held_out: list[str]
    footprint_m: float
    seconds: float
    cpu_seconds: float
    index_dir: str
    config: AdaptConfig
    look: LookChoice = field(default_factory=lambda: LookChoice("colour", {}))
    version_id: str | None = None
    log: list[dict[str, float]] = field(default_factory=list)

    decision: Decision | None = None
    pseudo: PseudoResult | None = None

    @property
    def use(self) -> bool:
        """Whether the new model should replace the one it was adapted from (`crossfit.Decision.use`)."""
        return self.decision.use if self.decision is not None else False

    @property
    def improved(self) -> bool:
        """The same answer as `use` (the name older scripts read)."""
        return self.use

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "parent_weights": self.parent_weights, "version": self.version_id,
                "use": self.use, "decision": self.decision.to_dict() if self.decision else None,
                "before": self.before.to_dict(), "after": self.after.to_dict(), "improved": self.improved,
                "trained_part": self.trained_part, "look": self.look.look, "look_scores": self.look.scores,
                "n_train": self.n_train, "n_holdout": len(self.held_out),
                "held_out": self.held_out, "footprint_m": round(self.footprint_m, 2),
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "index": self.index_dir, "epochs": self.config.epochs, "seed": self.config.seed,
                **(self.pseudo or PseudoResult([], 0, 0.0, [])).to_dict()}

    def json_line(self) -> str:
        return json.dumps(self.to_dict())


def _stage(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn:
    def report(f: float, msg: str) -> None:
        if progress:
            progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), msg)
    return report


def _check_cancel(cancel: CancelFn | None) -> None:
    if cancel and cancel():
        raise Cancelled(CANCELLED)


def split_holdout(labels: list[ResolvedLabel], config: AdaptConfig) -> tuple[list[ResolvedLabel], list[ResolvedLabel]]:
    """(train, held out), drawn with the config's seed; needs at least two labels, and keeps two to train."""
    n = len(labels)
    if n < 2:
        raise InputError("Adaptation needs at least 2 labelled pairs (each is checked by a model trained on the "
                         f"others); there {'is' if n == 1 else 'are'} {n}. Label more photos.")
    k = config.holdout_count if config.holdout_count is not None else round(n * config.holdout)
    k = min(max(int(k), 0), n - 2)  # two pairs at least stay to train and cross-fit the decision
    order = np.random.default_rng(config.seed).permutation(n)
    held = sorted(order[:k].tolist())
    return [labels[i] for i in range(n) if i not in held], [labels[i] for i in held]


def validation_figure(raster: str, labels: list[ResolvedLabel], net: EmbeddingModel, tiling: TilingConfig,
                      config: AdaptConfig, *, cache_dir: str | None = None, progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> tuple[ValidationFigure, str]:
    """Rank of each photo's true place against the raster's tile indexes, as `locate` would query them.

    The indexes are built (or reused) exactly as locate builds them, at the footprint and the sizes
    around it (`config.footprint_tolerance`), and each photo is ranked on the size it matches best; a
    photo with a heading in its EXIF is queried north-up once, any other at `rotations` headings;
    candidates are distinct places (NMS), and a candidate is the true place when its centre lies within
    one footprint of the label's.
    """
    sizes = around(tiling.footprint_m, config.footprint_tolerance, open_raster(raster))
    indexes = footprint_indexes(raster, sizes, tiling=tiling, model=ModelConfig(), embedder=net,
                                cache_dir=cache_dir, cancel=cancel, progress=_stage(progress, 0.0, 0.8))
    ranks = []
    for i, lb in enumerate(labels):
        _check_cancel(cancel)
        image = load_photo(str(lb.photo))
        q = photo_queries(net, image, read_priors(str(lb.photo)).yaw_deg, config.rotations)
        ranks.append(true_rank(best_footprint(indexes, q).scores, lb, config.max_rank))
        if progress:
            progress(0.8 + 0.2 * (i + 1) / len(labels), f"Checked {i + 1} of {len(labels)} held-out photos")
    return ValidationFigure(ranks, config.max_rank), str(indexes[sizes.index(tiling.footprint_m)].folder)


def _check_out(out: str) -> Path:
    p = Path(out).expanduser().absolute()
    if p.exists():
        raise InputError(f"{p} already exists; adaptation never overwrites a model. Choose a new --out file.")
    if p.suffix.lower() != ".safetensors":
        raise InputError(f"{p.name}: the adapted model is saved as .safetensors; give --out a .safetensors name.")
    if not p.parent.is_dir():
        raise InputError(f"Output folder {p.parent} does not exist; create it or choose another --out.")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"Cannot write in {p.parent}; choose another --out.")
    return p


def load_trainable(weights: str | None) -> CDIKTNet:
    """The active model as a CDIKTNet (no heads): the engine's default MobileNetV2 or a trained CDIKTNet file."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise InputError(f"Weights file not found: {path}. Check --weights.")
    state, meta = read_weights(path)
    if meta.architecture == "cdiktnet":
        return CDIKTNet(meta.backbone, 0, state, pooling=meta.pooling)
    return CDIKTNet("mobilenet_v2", 0, state, pooling=meta.pooling)


def _apply_look(model: CDIKTNet, raster: str, train: list[ResolvedLabel], config: AdaptConfig,
                crs_wkt: str) -> LookChoice:
    """Decide (or take) the look and fold it into `model`; an inherited luminance look stays."""
    if config.look not in LOOKS:
        raise InputError(f"Unknown look {config.look!r}; use one of {', '.join(LOOKS)}.")
    if sees_luminance(model):
        return LookChoice("luminance", {}, inherited=True)
    if config.look == "auto":
        side = float(np.median([lb.side_m for lb in train]))
        rng = np.random.default_rng([config.seed, 3])
        choice = choose_look(model, raster, train, sample_tile_centres(raster, side, 100, rng), crs_wkt,
                             config.rotations)
    else:
        choice = LookChoice(config.look, {})
    if choice.look == "luminance":
        fold_luminance(model)
    return choice


def unlabelled_pool(labelled: list[ResolvedLabel], photos: list[str], flight_photos: bool) -> list[str]:
    """The unlabelled photos adaptation may learn from: `photos`, plus with `flight_photos` the other photos in
    the labelled photos' folders (the rest of the flight), each once; a labelled photo never (its label says
    more)."""
    if flight_photos:
        photos = [*photos, *list_photos(sorted({str(lb.photo.parent) for lb in labelled}))]
    own = {lb.photo.resolve() for lb in labelled}
    return list(dict.fromkeys(p for p in photos if Path(p).resolve() not in own))


def _pseudo_pairs(raster: str, info: RasterInfo, pool: list[str], net: EmbeddingModel, tiling: TilingConfig,
                  config: AdaptConfig, cache_dir: str | None, progress: ProgressFn,
                  cancel: CancelFn | None) -> tuple[PseudoResult, list[str]]:
    """(the photos of `pool` placed with confidence, as pairs; the others that train without labels, CDTS:
    none unless `config.unlabelled_cdts`)."""
    keep = config.max_unlabelled if config.unlabelled_cdts else 0
    if config.pseudo is None or not pool:
        return PseudoResult([], 0, 0.0, []), _sample(pool, keep, config.seed)
    sizes = around(tiling.footprint_m, config.footprint_tolerance, info)
    indexes = footprint_indexes(raster, sizes, tiling=tiling, model=ModelConfig(), embedder=net, cache_dir=cache_dir,
                                cancel=cancel, progress=_stage(progress, 0.0, 0.3))
    found = pseudo_labels(info, pool, net, indexes, tiling.footprint_m, config.pseudo,
                          query=QueryConfig(rotations=config.rotations), seed=config.seed,
                          progress=_stage(progress, 0.3, 1.0), cancel=cancel)
    log.info("Pseudo-labels: %d of %d photos tried placed with confidence in %.0f s", len(found.labels), found.tried,
             found.seconds)
    placed = {lb.photo for lb in found.labels}
    return found, _sample([p for p in pool if Path(p) not in placed], keep, config.seed)


def _sample(photos: list[str], n: int, seed: int) -> list[str]:
    """At most n of the photos, a seeded sample in their order (a whole flight's folder would cost minutes)."""
    if len(photos) <= n:
        return photos
    if n <= 0:
        return []
    keep = np.sort(np.random.default_rng([seed, 8]).choice(len(photos), n, replace=False))
    return [photos[int(i)] for i in keep]


def adapt_model(request: AdaptRequest, *, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None) -> AdaptResult:
    """The job as every front end asks for it: one AdaptRequest, unchanged (see core.requests)."""
    config = AdaptConfig(seed=request.seed, look=request.look, runtime=request.model.runtime,
                         **({"epochs": request.epochs} if request.epochs else {}))
    registry = ModelRegistry(request.data_dir) if request.record else None
    return adapt(request.raster, request.labels, request.out, request.model.weights, config=config,
                 photos=list(request.photos), flight_photos=request.flight_photos, cache_dir=request.cache_dir,
                 registry=registry, threads=request.model.threads, progress=progress, cancel=cancel)


def adapt(raster: str, labels: str | LabelSet, out: str, weights: str | None = None, *,
          config: AdaptConfig = AdaptConfig(), photos: list[str] | None = None, flight_photos: bool = False,
          cache_dir: str | None = None, registry: ModelRegistry | None = None, threads: int | None = None,
          progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> AdaptResult:
    """Fine-tune `weights` (None: the embedded default) on the labelled pairs; write the new model to `out`.

    `photos`: unlabelled photos of the same area (pseudo pairs where the current model is sure, else CDTS);
    `flight_photos`: add the other photos in the labelled photos' folders to them. `registry`: where the new
    version is recorded (None: not recorded). Raises InputError for unusable input (before any training),
    Cancelled when `cancel()` turns true (nothing written).
    """
    try:
        return _adapt(raster, labels, out, weights, config=config, photos=photos, flight_photos=flight_photos,
                      cache_dir=cache_dir, registry=registry, threads=threads, progress=progress, cancel=cancel)
    except Cancelled:  # also from an index build inside: what matters to the user is the model
        raise Cancelled(CANCELLED) from None


CANCELLED = "Adaptation cancelled; nothing was written and the active model is unchanged."


def _adapt(raster: str, labels: str | LabelSet, out: str, weights: str | None, *, config: AdaptConfig,
           photos: list[str] | None, flight_photos: bool, cache_dir: str | None, registry: ModelRegistry | None,
           threads: int | None, progress: ProgressFn | None, cancel: CancelFn | None) -> AdaptResult:
    t0, c0 = time.perf_counter(), time.process_time()
    if progress:
        progress(0.0, "Checking the labelled pairs")
    out_path = _check_out(out)
    if registry is not None:  # an unreadable registry found after training would lose the run's figures
        registry.check_writable()
    info = open_raster(raster)
    label_set = labels if isinstance(labels, LabelSet) else read_labels(labels)
    a = info.affine
    xs, ys = (a.c, a.c + a.a * info.width), (a.f, a.f + a.e * info.height)
    bounds = (min(xs), min(ys), max(xs), max(ys))
    resolved = resolve_labels(label_set, info.crs_wkt, bounds, Path(raster).name)
    train, held = split_holdout(resolved, config)
    pool = unlabelled_pool(resolved, photos or [], flight_photos)
    footprint = config.footprint_m or round(float(np.median([lb.side_m for lb in resolved])), 1)
    tiling = TilingConfig(footprint_m=footprint)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)

    _check_cancel(cancel)
    before_net = EmbeddingModel.load(weights, "cpu", threads, config.runtime)
    _check_cancel(cancel)
    before_index = build_index(raster, tiling, cache_dir=cache_dir, embedder=before_net, cancel=cancel,
                               progress=_stage(progress, 0.0, 0.12))
    crops = [query_crops(load_photo(str(lb.photo)), read_priors(str(lb.photo)).yaw_deg, config.rotations,
                         before_net.meta.input_size) for lb in train]  # decoded once: the check reuses them
    before_queries = [before_net.embed(before_net.normalise(c)) for c in crops]
    if held:
        before, _ = validation_figure(raster, held, before_net, tiling, config, cache_dir=cache_dir, cancel=cancel,
                                      progress=_stage(progress, 0.12, 0.15))
        log.info("Before adaptation, on %d pairs kept out: %s", len(held), before.to_dict())

    pseudo, loose = _pseudo_pairs(raster, info, pool, before_net, tiling, config, cache_dir,
                                  _stage(progress, 0.15, 0.22), cancel)
    model = load_trainable(weights).eval()
    look = _apply_look(model, raster, train, config, info.crs_wkt)
    _check_cancel(cancel)
    # The pseudo pairs train like labels but come after them: the check (cross_fit) ranks only `train`.
    views = build_views(model, raster, train + pseudo.labels, loose, config.train, config.augment, config.seed,
                        before_net, progress=_stage(progress, 0.22, 0.35), cancel=cancel)
    decision = cross_fit(views, model, raster, train, before_index, before_queries, crops, config.train,
                         config.epochs, config.seed, config.max_rank, progress=_stage(progress, 0.35, 0.75),
                         cancel=cancel)
    log.info("Keep-or-reject check: %s", decision.to_dict())
    history = train_head(views, model, config.train, config.epochs, config.seed,
                         progress=_stage(progress, 0.75, 0.85), cancel=cancel)
    _check_cancel(cancel)

    with atomic_path(out_path) as tmp:  # published only when measured, not cancelled, and still new
        save_inference_weights(model, tmp)
        index_dir = ""
        if held:
            after_net = EmbeddingModel.load(str(tmp), "cpu", threads, config.runtime)
            after, index_dir = validation_figure(raster, held, after_net, tiling, config, cache_dir=cache_dir,
                                                 cancel=cancel, progress=_stage(progress, 0.85, 1.0))
            log.info("After adaptation, on %d pairs kept out: %s", len(held), after.to_dict())
        else:  # the figures are the check's: each pair ranked by a model that did not train on it
            before = ValidationFigure(decision.before, config.max_rank)
            after = ValidationFigure(decision.after, config.max_rank)
        _check_cancel(cancel)
        if out_path.exists():
            raise InputError(f"{out_path} appeared while adapting; adaptation never overwrites a model.")
    result = AdaptResult(
        out=str(out_path), parent_weights=str(Path(weights).absolute()) if weights else None, before=before,
        after=after, trained_part=f"{views.trained_part}; {look.describe()}", n_train=len(train),
        held_out=[lb.photo.name for lb in held],
        footprint_m=footprint, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
        index_dir=index_dir, config=config, look=look, log=history, decision=decision, pseudo=pseudo)
    if registry is not None:
        kept = ("before", "after", "use", "decision", "trained_part", "look", "n_train", "n_holdout", "footprint_m",
                "epochs", "seed", "pseudo_pairs")
        figures = {k: v for k, v in result.to_dict().items() if k in kept}
        figures["raster"] = Path(raster).name
        result.version_id = registry.add(out_path, result.parent_weights, figures).id
    if progress:
        verdict = "use it" if decision.use else "keep the current model"
        progress(1.0, f"Adapted: top-1 {100 * before.top1:.0f} % → {100 * after.top1:.0f} % on {after.n} "
                      f"photos it did not train on; {verdict}")
    return result

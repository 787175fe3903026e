"""The three ways CDIKTNet is trained, wired from a `TrainConfig` to the stages of `loop.py`.

- supervised: CDIS on every pair of the training split (or of the simulated raster pairs);
- fewshot: a seeded fraction of locations (or pairs) keeps its pairing; CDIS on that part, then
  CDTS, initialised from it, on every image, the paired ones keeping their location as anchors;
- crossdomain: a model trained elsewhere (--init) adapted by CDTS to the target data, no pairs.
Input errors surface before the model is built: the data is read (and bad folders refused)
first, and the starting weights are checked next.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from model_backend.core.atomic import atomic_path
from model_backend.core.errors import InputError
from model_backend.learn.datasets import AugmentConfig, PairTransform, split_paired
from model_backend.learn.training.checkpoint import FORMAT, load_checkpoint, seed_everything
from model_backend.learn.training.config import TrainConfig
from model_backend.learn.training.data import (
    ImageSet,
    PairSource,
    RasterPairs,
    benchmark_pairs,
    pair_subset,
    raster_entries,
    raster_image_set,
    raster_locations,
    raster_records,
    read_train_records,
    record_pairs,
    records_image_set,
)
from model_backend.learn.training.engine import freeze_blocks, make_runtime, ranks_agree
from model_backend.learn.training.loop import StopRun, Trainer
from model_backend.nn.cdiktnet import CDIKTNet, save_inference_weights
from model_backend.nn.cdiktnet.backbone import TORCHVISION_MOBILENET, build_backbone

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced and how it went (the CLI prints `summary()` as JSON)."""

    out: str
    checkpoint: str
    mode: str
    steps: int
    seconds: float
    images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False
    world_size: int = 1
    """Processes of the job (torchrun's WORLD_SIZE); rank 0 wrote the output."""
    ranks_in_sync: bool = True
    """Every rank ended with the same parameters (checked under torchrun; see `ranks_agree`)."""

    def summary(self) -> dict[str, Any]:
        first = [h for h in self.history[:5]]
        last = [h for h in self.history[-5:]]

        def mean_loss(rows: list[dict[str, float]]) -> float | None:
            return round(sum(r["loss"] for r in rows) / len(rows), 4) if rows else None

        return {"out": self.out, "checkpoint": self.checkpoint, "mode": self.mode, "steps": self.steps,
                "seconds": round(self.seconds, 1), "images_per_s": round(self.images_per_s, 2),
                "loss_first": mean_loss(first), "loss_last": mean_loss(last), "stopped": self.stopped,
                "world_size": self.world_size, "ranks_in_sync": self.ranks_in_sync}


def initial_weights(cfg: TrainConfig) -> tuple[str, dict[str, torch.Tensor] | None, str]:
    """(backbone name, backbone state or None, description) from --init, or the offline ImageNet default."""
    from model_backend.nn.weights import imagenet_weights_path, read_weights

    if cfg.init:
        path = Path(cfg.init)
        if path.suffix == ".pt" and path.name.endswith(".ckpt.pt"):
            ck = load_checkpoint(path)
            name = ck["config"].get("backbone") or TORCHVISION_MOBILENET
            state = {k: v for k, v in ck["model"].items() if k.startswith("backbone.")}
            return _check_backbone(cfg, name), state, f"checkpoint {path.name}"
        state, meta = read_weights(path)
        if meta.architecture == "cdiktnet":
            return _check_backbone(cfg, meta.backbone), state, f"CDIKTNet {path.name}"
        return cfg.backbone or TORCHVISION_MOBILENET, state, f"backbone weights {path.name}"
    name = cfg.backbone or TORCHVISION_MOBILENET
    if name == TORCHVISION_MOBILENET:
        path = imagenet_weights_path()
        if not path.is_file():
            raise InputError(f"ImageNet MobileNetV2 weights missing ({path}); run `make setup` or give --init.")
        return name, read_weights(path)[0], "ImageNet MobileNetV2"
    log.warning("No --init for %s: training from random weights (give ImageNet weights with --init FILE)", name)
    return name, None, "random"


def _check_backbone(cfg: TrainConfig, name: str) -> str:
    if cfg.backbone and cfg.backbone != name:
        raise InputError(f"--init holds a {name} model but --backbone says {cfg.backbone}; drop --backbone.")
    return name


@dataclass
class _Data:
    pairs: PairSource | None
    images_fn: Any  # () -> ImageSet | None, built after CDIS (raster views are rendered then)
    n_classes: int


def _prepare(cfg: TrainConfig, size: int) -> _Data:
    """Read (or simulate) the data of the layout and split it as the mode wants; no transform yet
    (it needs the model's normalisation), see `_set_transform`."""
    if cfg.layout == "raster":
        entries = raster_entries(cfg.data, cfg.footprint_m)
        ds = RasterPairs(raster_locations(entries, cfg.seed, cfg.grid_step, cfg.locations), cfg.views_per_location,
                         size, None, cfg.seed)
        log.info("Raster data: %d locations (%d labels) over %d rasters", len(ds.locations), max(ds.labels) + 1,
                 len(entries))
        if cfg.mode == "supervised":
            return _Data(PairSource(ds, ds.labels, max(ds.labels) + 1, f"{len(ds)} simulated pairs"), None,
                         max(ds.labels) + 1)
        if cfg.mode == "crossdomain":
            return _Data(None, lambda: raster_image_set(ds, set()), 0)
        split = split_paired(raster_records(ds), cfg.paired_fraction or 0.02, cfg.seed, cfg.paired_unit)
        items = [int(d.path) for d, _ in split.paired]
        source = pair_subset(ds, items)
        return _Data(source, lambda: raster_image_set(ds, set(items)), source.n_classes)
    drone, sats = read_train_records(cfg.layout, cfg.data, cfg.height)
    if cfg.mode == "supervised":
        pairs = benchmark_pairs(drone, sats)
        return _Data(record_pairs(pairs, None, cfg.seed, "all"), None, len({d.location for d in drone}))
    if cfg.mode == "crossdomain":
        return _Data(None, lambda: records_image_set(drone, sats, set(), set()), 0)
    split = split_paired([*drone, *sats], cfg.paired_fraction or 0.02, cfg.seed, cfg.paired_unit)
    known = {d.path for d, _ in split.paired}
    locs = {d.location for d, _ in split.paired}
    source = record_pairs(split.paired, None, cfg.seed, f"paired {cfg.paired_fraction:g}")
    return _Data(source, lambda: records_image_set(drone, sats, known, locs), len(locs))


def _set_transform(source: PairSource, transform: PairTransform) -> None:
    ds = source.dataset
    ds = getattr(ds, "dataset", ds)  # a Subset of simulated pairs
    ds.transform = transform


def train(cfg: TrainConfig, verbose: bool = True) -> TrainResult:
    """Run (or resume) one training job; writes `cfg.out` (inference weights) and FILE.ckpt.pt."""
    cfg.validate()
    t0 = time.perf_counter()
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    seed_everything(cfg.seed)
    backbone, state, what = initial_weights(cfg)
    cfg = replace(cfg, backbone=backbone)
    if resume is not None:
        why = cfg.mismatch(resume["config"])
        if why:
            raise InputError(f"--resume: this command differs from the checkpoint's in {why}; use the same settings.")
    size = cfg.input_size or (224 if backbone == TORCHVISION_MOBILENET else build_backbone(backbone)[3])
    cfg = replace(cfg, input_size=size)
    data = _prepare(cfg, size)  # layout errors before the model is built
    rt = make_runtime(cfg)
    seed_everything(cfg.seed)
    model = CDIKTNet(backbone, data.n_classes, pretrained_state=state)
    if resume is not None:
        model.set_n_classes(int(resume["n_classes"]))
        model.load_state_dict(resume["model"])
    bb = model.backbone
    transform = PairTransform(size, bb.mean, bb.std, train=True, config=AugmentConfig(p_grey=cfg.grey))
    if data.pairs is not None:
        _set_transform(data.pairs, transform)
    frozen = freeze_blocks(bb, cfg.freeze_blocks) if cfg.freeze_blocks else []
    model = model.to(rt.device)
    if rt.cuda:
        model = model.to(memory_format=torch.channels_last)
    if rt.is_main:
        log.info("Training %s from %s (%s, %d px, %d classes) on %s%s", cfg.mode, what, backbone, size,
                 data.n_classes, rt.device, f", AMP {rt.amp_dtype}" if rt.amp_dtype else "")
    trainer = Trainer(cfg, model, rt, transform, frozen, resume)
    stopped, in_sync = False, True
    try:
        if cfg.mode in ("supervised", "fewshot") and data.pairs is not None:
            trainer.cdis(data.pairs)
        elif trainer.state.stage == "cdis":  # crossdomain: no paired stage
            trainer.state.stage = "cdts"
        if cfg.mode in ("fewshot", "crossdomain"):
            images: ImageSet = data.images_fn()
            trainer.cdts(images)
        trainer.state.stage = "done"
        trainer.checkpoint()
        in_sync = ranks_agree(model, rt)
        if not in_sync and rt.is_main:
            log.error("The %d processes ended with different weights; rank 0's are written. Rerun, or train "
                      "in one process, and report it.", rt.world)
        if rt.is_main:
            write_inference(model, cfg.out, size)
    except StopRun as exc:
        stopped = True
        if rt.is_main and verbose:
            log.warning("%s", exc)
    s = trainer.state
    return TrainResult(str(cfg.out), str(cfg.checkpoint_path), cfg.mode, s.step, time.perf_counter() - t0,
                       s.images_per_s, s.history, stopped, rt.world, in_sync)


def write_inference(model: CDIKTNet, out: str | Path, input_size: int) -> Path:
    """The backbone alone as .safetensors with its cdikt_meta header, written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_inference_weights(model, tmp, meta={"input_size": int(input_size)})
    return out


__all__ = ["FORMAT", "TrainResult", "initial_weights", "train", "write_inference"]

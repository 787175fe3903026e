"""The two training stages of CDIKTNet and the run state they share (step, checkpoint, resume).

- CDIS (paired): batches of one pair per location through the shared backbone and the invariance
  heads; loss = InfoNCE + 0.1 x heads CE + alignment (`CDISLoss`). AdamW, warm-up + cosine.
- CDTS (unpaired): each epoch, every image is embedded (flip-averaged), clustered into pseudo
  locations (`make_pseudo_labels`: per view, then in a shared space) and its cluster memories are
  built; each step pulls P x K images per view towards their centroids (`CDTSMemory`), BatchNorm
  statistics frozen as the memories saw them (`set_train(batchnorm_stats=False)`). Known
  pairs (few-shot anchors) keep their location as a fixed label throughout.
A run is resumable at any step: the checkpoint holds everything a step depends on, and batches
and augmentations are functions of (seed, epoch, position), not of how the run got there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from model_backend.core.errors import InputError
from model_backend.learn.datasets import LocationBatchSampler, PairTransform
from model_backend.learn.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from model_backend.learn.training.config import TrainConfig
from model_backend.learn.training.data import Images, ImageSet, PairSource
from model_backend.learn.training.engine import (
    Progress,
    Runtime,
    SkipBatches,
    WarmupCosine,
    optimizer_step,
    param_groups,
    set_train,
)
from model_backend.learn.training.unpaired import cluster_batches, embed_all, pseudo_labels
from model_backend.nn.cdiktnet import (
    CDIKTNet,
    CDISLoss,
    CDISLossConfig,
    CDTSConfig,
    CDTSMemory,
    ClusterMemory,
    PseudoLabels,
)
from model_backend.nn.cdiktnet.cdis import InferenceNet

log = logging.getLogger(__name__)


class StopRun(Exception):
    """Raised after the checkpoint when `stop_after` steps are done (an interrupted run, on purpose)."""


@dataclass
class RunState:
    """Where the run is: global step, stage, epoch and batch inside it; the loss history."""

    step: int = 0
    stage: str = "cdis"
    stage_start: int = 0
    epoch: int = 0
    batch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_s: float = 0.0


class Trainer:
    """Owns the model, the run state and the checkpoint; runs one stage at a time."""

    def __init__(self, cfg: TrainConfig, model: CDIKTNet, rt: Runtime, transform: PairTransform,
                 frozen: list[torch.nn.Module], resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.model, self.rt, self.transform, self.frozen = cfg, model, rt, transform, frozen
        self.state = RunState()
        self.resume = resume
        self.opt: torch.optim.Optimizer | None = None
        self.sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self.cdts_extra: dict[str, Any] | None = None
        if resume is not None:
            s = resume["state"]
            self.state = RunState(s["step"], s["stage"], s["stage_start"], s["epoch"], s["batch"],
                                  list(resume.get("history", [])), s.get("images_per_s", 0.0))

    # ------------------------------------------------------------ shared

    def _make_optimizer(self, total: int, warmup: int, lr: float, backbone_scale: float, backbone_only: bool) -> None:
        groups = param_groups(self.model, lr, backbone_scale, self.cfg.weight_decay, backbone_only)
        try:  # fused: one kernel over all tensors, ~5x faster than the per-tensor loop on a CPU
            self.opt = torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, WarmupCosine(total, warmup))
        if self.resume is not None and self.resume["state"]["stage"] == self.state.stage:
            self.opt.load_state_dict(self.resume["optimizer"])
            self.sched.load_state_dict(self.resume["scheduler"])
            if self.rt.scaler is not None and self.resume.get("scaler"):
                self.rt.scaler.load_state_dict(self.resume["scaler"])
            set_rng_state(self.resume["rng"])
            self.resume = None  # consumed: later stages start fresh

    def _params(self) -> list[torch.nn.Parameter]:
        if self.opt is None:
            raise RuntimeError("no optimizer: a stage must call _make_optimizer first")
        return [p for g in self.opt.param_groups for p in g["params"]]

    def checkpoint(self) -> None:
        """Write FILE.ckpt.pt (rank 0; every rank waits so none runs ahead of a crash-consistent state)."""
        if self.rt.is_main:
            s = self.state
            payload = {
                "config": self.cfg.to_dict(), "model": self.model.state_dict(), "n_classes": self.model.n_classes,
                "optimizer": self.opt.state_dict() if self.opt else None,
                "scheduler": self.sched.state_dict() if self.sched else None,
                "scaler": self.rt.scaler.state_dict() if self.rt.scaler is not None else None,
                "state": {"step": s.step, "stage": s.stage, "stage_start": s.stage_start, "epoch": s.epoch,
                          "batch": s.batch, "images_per_s": s.images_per_s},
                "rng": rng_state(), "history": s.history, "cdts": self.cdts_extra,
            }
            save_checkpoint(self.cfg.checkpoint_path, payload)
        from model_backend.core.dist import barrier

        barrier()

    def _after_step(self, parts: dict[str, float], progress: Progress) -> None:
        s = self.state
        s.step += 1
        s.batch += 1
        s.history.append({"step": s.step, "stage": 0 if s.stage == "cdis" else 1, **parts})
        s.images_per_s = progress.rate
        if s.step % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        if self.cfg.stop_after is not None and s.step >= self.cfg.stop_after:
            self.checkpoint()
            raise StopRun(f"stopped after step {s.step} as asked; resume with --resume {self.cfg.checkpoint_path}")

    # ------------------------------------------------------------ CDIS

    def cdis(self, source: PairSource) -> None:
        """Supervised CDIS on `source` for `cfg.steps` steps (or `cfg.epochs` epochs)."""
        cfg, rt, s = self.cfg, self.rt, self.state
        if s.stage != "cdis":
            return
        batch = min(cfg.batch_size, len(set(source.labels)))
        if batch < 2:
            raise InputError("CDIS needs pairs of at least 2 locations: each pair's negatives are the other pairs.")
        sampler = LocationBatchSampler(source.labels, batch, seed=cfg.seed, drop_last=True,
                                       num_replicas=rt.world, rank=rt.rank)
        per_epoch = len(sampler)
        if per_epoch == 0:
            raise InputError(f"Too few pairs for one batch of {batch} on each of {rt.world} processes.")
        total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
        weight = cfg.alignment_weight if cfg.alignment_weight is not None else \
            CDISLossConfig.for_dataset(cfg.layout).alignment_weight
        loss_fn = CDISLoss(CDISLossConfig(alignment_weight=weight, ce_weight=cfg.ce_weight))
        self._make_optimizer(total, round(cfg.warmup_epochs * per_epoch), cfg.lr, cfg.backbone_lr_scale, False)
        unused = weight == 0 or cfg.ce_weight == 0
        net = DDP(self.model, device_ids=[rt.device] if rt.cuda else None, find_unused_parameters=unused) \
            if rt.world > 1 else self.model
        done = s.step - s.stage_start
        progress = Progress(total, "cdis", cfg.log_every, rt.is_main, start=done)
        if rt.is_main:
            log.info("CDIS: %s, batch %d x %d processes, %d steps (%d per epoch)", source.description, batch,
                     rt.world, total, per_epoch)
        while done < total:
            sampler.set_epoch(s.epoch)
            source.set_epoch(s.epoch)
            loader = DataLoader(source.dataset, batch_sampler=SkipBatches(sampler, s.batch), num_workers=rt.workers,
                                pin_memory=rt.cuda, generator=torch.Generator())
            set_train(self.model, self.frozen)
            progress.t_last = time.perf_counter()
            for drone, sat, labels in loader:
                with rt.autocast():
                    out = net(rt.to_device(drone), rt.to_device(sat))
                    res = loss_fn(out, labels.to(rt.device))
                norm = optimizer_step(res.total, self._params(), self.opt, self.sched, rt, cfg.clip_grad)
                parts = {**res.as_floats(), "grad_norm": norm}
                progress.update(2 * len(labels) * rt.world, {k: v for k, v in parts.items() if k != "grad_norm"},
                                self.sched.get_last_lr()[0])
                self._after_step(parts, progress)
                done += 1
                if done >= total:
                    break
            else:
                s.epoch, s.batch = s.epoch + 1, 0
        progress.close()
        s.stage, s.stage_start, s.epoch, s.batch = "cdts", s.step, 0, 0
        self.opt = self.sched = None

    # ------------------------------------------------------------ CDTS

    def cdts(self, images: ImageSet) -> None:
        """CDTS on every image of `images` for `cfg.cdts_epochs` epochs; -1 = unpaired, else a fixed label."""
        cfg, rt, s = self.cfg, self.rt, self.state
        if s.stage != "cdts" or cfg.cdts_epochs == 0:
            s.stage = "done"
            return
        ccfg = CDTSConfig(k1=cfg.cdts_k1, shared_from_epoch=cfg.shared_from_epoch if cfg.shared_from_epoch is not None
                          else max(1, cfg.cdts_epochs // 2))
        n_d = len(images.drone)
        rep = max(ccfg.min_samples, min(50, round(n_d / max(1, len(images.satellite)))))
        sat_items = [it for it in images.satellite for _ in range(rep)]  # DMNIL: satellites duplicated
        sat_known = np.repeat(images.sat_known, rep)
        train_d = Images(images.drone, [False] * n_d, self.transform, cfg.seed, train=True)
        train_s = Images(sat_items, [True] * len(sat_items), self.transform, cfg.seed + 1, train=True)
        k = 4
        per_view = max(k, cfg.batch_size // k * k)
        # default: one pass over the drone images per epoch for the whole job (as CDIS's epoch), not per rank
        iters = cfg.cdts_iters or max(1, n_d // (per_view * rt.world))
        resume = self.resume
        self._make_optimizer(cfg.cdts_epochs * iters, 0, cfg.lr * cfg.cdts_lr_scale, 1.0, True)
        embed_net = InferenceNet(self.model.backbone)
        net = DDP(embed_net, device_ids=[rt.device] if rt.cuda else None) if rt.world > 1 else embed_net
        progress = Progress(cfg.cdts_epochs * iters, "cdts", cfg.log_every, rt.is_main, start=s.step - s.stage_start)
        if rt.is_main:
            log.info("CDTS: %s; satellites x%d; %d epochs x %d steps of %d+%d images x %d processes",
                     images.description, rep, cfg.cdts_epochs, iters, per_view, per_view, rt.world)
        while s.epoch < cfg.cdts_epochs:
            if resume is not None and resume.get("cdts"):
                labels, memory = _restore_cdts(resume["cdts"], ccfg, rt.device)
                resume = None
            else:
                self.model.eval()
                fd = embed_all(net, images.drone, self.transform, rt)
                fs = embed_all(net, images.satellite, self.transform, rt).repeat_interleave(rep, dim=0)
                labels = pseudo_labels(fd, fs, ccfg, s.epoch, images.drone_known, sat_known, rt)
                memory = CDTSMemory.build(fd, fs, labels, ccfg, s.epoch, rt.device)
                self.cdts_extra = _cdts_payload(labels, memory)
                s.batch = 0
            summary = labels.summary()
            if rt.is_main:
                log.info("CDTS epoch %d: %s", s.epoch, summary)
            self.cdts_extra = _cdts_payload(labels, memory)
            plan_d = cluster_batches(labels.drone, per_view // k, k, iters, [cfg.seed, s.epoch, rt.rank, 0])
            plan_s = cluster_batches(labels.satellite, per_view // k, k, iters, [cfg.seed, s.epoch, rt.rank, 1])
            if not plan_d or not plan_s:
                log.warning("CDTS epoch %d: no clusters in a view (%s); epoch skipped", s.epoch, summary)
                s.step += iters - s.batch
                s.epoch, s.batch = s.epoch + 1, 0
                continue
            train_d.set_epoch(s.epoch)
            train_s.set_epoch(s.epoch)
            dl_d = DataLoader(train_d, batch_sampler=SkipBatches(plan_d, s.batch), num_workers=rt.workers,
                              generator=torch.Generator())
            dl_s = DataLoader(train_s, batch_sampler=SkipBatches(plan_s, s.batch), num_workers=rt.workers,
                              generator=torch.Generator())
            set_train(self.model, self.frozen, batchnorm_stats=False)  # BatchNorm as the memories saw it
            memory.train()
            progress.t_last = time.perf_counter()
            lab = {name: torch.as_tensor(getattr(labels, name), device=rt.device)
                   for name in ("drone", "satellite", "drone_cross", "satellite_cross")}
            for (xd, idx_d), (xs, idx_s) in zip(dl_d, dl_s):
                idx_d, idx_s = idx_d.to(rt.device), idx_s.to(rt.device)
                with rt.autocast():
                    feats = net(torch.cat([rt.to_device(xd), rt.to_device(xs)]))
                fd_b, fs_b = feats[:len(xd)], feats[len(xd):]
                res = memory(fd_b, lab["drone"][idx_d], fs_b, lab["satellite"][idx_s],
                             None if labels.shared else lab["drone_cross"][idx_d],
                             None if labels.shared else lab["satellite_cross"][idx_s])
                optimizer_step(res.total, self._params(), self.opt, self.sched, rt, cfg.clip_grad)
                self.cdts_extra = _cdts_payload(labels, memory)
                progress.update((len(xd) + len(xs)) * rt.world, res.as_floats(), self.sched.get_last_lr()[0],
                                f"clusters {summary['drone_clusters']}/{summary['satellite_clusters']}")
                self._after_step(res.as_floats(), progress)
            s.epoch, s.batch = s.epoch + 1, 0
        progress.close()
        s.stage = "done"
        self.cdts_extra = None


def _cdts_payload(labels: PseudoLabels, memory: CDTSMemory) -> dict[str, Any]:
    """The epoch's pseudo labels and current centroids, so a checkpoint mid-epoch resumes exactly."""
    return {"drone": torch.from_numpy(labels.drone), "satellite": torch.from_numpy(labels.satellite),
            "drone_cross": torch.from_numpy(labels.drone_cross),
            "satellite_cross": torch.from_numpy(labels.satellite_cross), "shared": labels.shared,
            "mem_drone": memory.drone.features.detach().cpu().clone(), "momentum": memory.drone.momentum,
            "mem_satellite": None if memory.satellite is None else memory.satellite.features.detach().cpu().clone()}


def _restore_cdts(p: dict[str, Any], ccfg: CDTSConfig, device: torch.device) -> tuple[PseudoLabels, CDTSMemory]:
    labels = PseudoLabels(p["drone"].numpy(), p["satellite"].numpy(), p["drone_cross"].numpy(),
                          p["satellite_cross"].numpy(), bool(p["shared"]))

    def mem(features: torch.Tensor) -> ClusterMemory:
        m = ClusterMemory(features, ccfg.temperature, float(p["momentum"]))
        m.features = features.clone()
        return m

    sat = None if p["mem_satellite"] is None else mem(p["mem_satellite"])
    return labels, CDTSMemory(mem(p["mem_drone"]), sat, ccfg.cross_view_weight).to(device)

"""The device-side plumbing every stage shares: device and AMP, DDP, optimizer groups, schedule,
frozen blocks, and the progress line.

Kept apart from the stages so that the CDIS and CDTS loops read as the method, and so the CPU
path (what runs here) and the CUDA path (bf16/fp16 autocast, channels_last, NCCL) differ in one
place only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from model_backend.core.dist import init_distributed, is_distributed
from model_backend.learn.training.config import TrainConfig


@dataclass
class Runtime:
    """Where this process trains: device, rank/world under torchrun, AMP dtype and loss scaler."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    workers: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs to the device; NHWC on CUDA, where convolutions under AMP run fastest channels-last."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda and x.dim() == 4 else x


def make_runtime(cfg: TrainConfig) -> Runtime:
    """Join torchrun's process group when WORLD_SIZE > 1; pick AMP (GPU; CPU bf16 if asked) and loader workers."""
    rank, world, device = init_distributed(cfg.device)
    amp = cfg.amp
    dtype: torch.dtype | None = None
    if device.type == "cuda" and amp != "off":
        if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
            dtype = torch.bfloat16
        else:
            dtype = torch.float16
    elif device.type == "cpu" and amp == "bf16":  # asked for by name only: on most CPUs bf16 is emulated, slower
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if cfg.workers is not None:
        workers = cfg.workers
    else:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(4, max(0, cores // max(world, 1) - 1)) if device.type == "cuda" else (1 if cores > 2 else 0)
    return Runtime(device, rank, world, dtype, scaler, workers)


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in input-to-output order, for `--freeze-blocks`."""
    if hasattr(backbone, "features"):  # torchvision MobileNetV2: 19 blocks
        return list(backbone.features.children())
    m = getattr(backbone, "model", backbone)
    if hasattr(m, "stem") and hasattr(m, "stages"):  # timm ConvNeXt, RegNet, ...
        return [m.stem, *m.stages]
    if hasattr(m, "patch_embed") and hasattr(m, "blocks"):  # timm ViT family
        return [m.patch_embed, *m.blocks]
    if hasattr(m, "layer1"):  # timm ResNet
        return [nn.Sequential(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4]
    return list(m.children())


def freeze_blocks(backbone: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the first n blocks (no gradients); the caller keeps them in eval mode (`set_train`)."""
    blocks = backbone_blocks(backbone)
    if n >= len(blocks):
        from model_backend.core.errors import InputError

        raise InputError(f"--freeze-blocks {n} would freeze the whole backbone ({len(blocks)} blocks).")
    for block in blocks[:n]:
        for p in block.parameters():
            p.requires_grad_(False)
    return blocks[:n]


def set_train(model: nn.Module, frozen: Iterable[nn.Module], batchnorm_stats: bool = True) -> None:
    """Train mode, except frozen blocks: their BatchNorm keeps its ImageNet statistics, which small
    batches of a few dozen aerial images would otherwise overwrite.

    `batchnorm_stats=False` keeps every BatchNorm layer in eval mode (running statistics used and
    left alone; its scale and shift still learn). CDTS needs this: its cluster memories hold
    eval-mode features, and a batch of a few pseudo locations normalised by its own statistics
    is not comparable to them, while its running statistics drift towards those batches (on the
    tiny test data, 10 CDTS steps at a learning rate of ~0 alone took R@1 from 89 to 72 %).
    """
    model.train()
    for block in frozen:
        block.eval()
    if not batchnorm_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def ranks_agree(model: nn.Module, rt: Runtime) -> bool:
    """True when every rank holds the same parameters (always, in one process); call on all ranks.

    DDP keeps ranks equal by construction (same start, all-reduced gradients, same optimizer
    arithmetic), and only rank 0 writes the model: a rank that drifted (a step it skipped, a
    gradient it did not share) would leave no trace but a worse model. Compared: a float64 sum
    and sum of squares per parameter, gathered from every rank. Buffers are left out: DDP
    broadcasts rank 0's BatchNorm statistics before each forward, so the other ranks' copies lag
    one step behind by design and are never written.
    """
    if rt.world <= 1 or not is_distributed():
        return True
    import torch.distributed as dist

    digest = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                          for p in model.parameters()]).flatten().to(rt.device)
    every = [torch.empty_like(digest) for _ in range(rt.world)]
    dist.all_gather(every, digest)
    return all(torch.equal(every[0], d) for d in every[1:])


def param_groups(model: nn.Module, lr: float, backbone_scale: float, weight_decay: float,
                 backbone_only: bool = False) -> list[dict]:
    """Backbone at lr x backbone_scale, heads at lr; no weight decay on biases, norms and the logit scale."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith("backbone.")
        if backbone_only and not is_backbone:
            continue
        groups.setdefault((is_backbone, p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_scale if bb else 1.0), "weight_decay": 0.0 if flat else weight_decay}
            for (bb, flat), ps in sorted(groups.items())]


class WarmupCosine:
    """LR factor: linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total` steps.

    A class rather than a lambda so the scheduler's state_dict can record it (and a checkpoint
    shows which schedule a run used).
    """

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = max(1, int(total)), max(0, int(warmup))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))


def optimizer_step(loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, rt: Runtime, clip: float) -> float:
    """Backward, unscale (fp16), clip the global norm, step, schedule; returns the gradient norm."""
    opt.zero_grad(set_to_none=True)
    if rt.scaler is not None:
        rt.scaler.scale(loss).backward()
        rt.scaler.unscale_(opt)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.zeros(())
    if rt.scaler is not None:
        rt.scaler.step(opt)
        rt.scaler.update()
    else:
        opt.step()
    sched.step()
    return float(norm)


class Progress:
    """Progress with loss parts and throughput: a tqdm bar on a terminal, plain lines otherwise.

    Plain lines (every `every` steps, and the first and last) go to stderr so logs of background
    runs read as a loss curve; stdout stays free for the command's JSON result.
    """

    def __init__(self, total: int, stage: str, every: int, enabled: bool, start: int = 0) -> None:
        self.total, self.stage, self.every, self.enabled, self.n = total, stage, max(1, every), enabled, start
        self.t_last, self.rate = time.perf_counter(), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc=stage, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, images: int, parts: dict[str, float], lr: float, extra: str = "") -> None:
        """One step done; `images` = images of the step over all ranks (the throughput shown is the job's)."""
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        rate = images / dt if dt > 0 else 0.0
        self.rate = rate if self.rate == 0.0 else 0.8 * self.rate + 0.2 * rate
        self.n += 1
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
        if self.bar is not None:
            self.bar.set_postfix_str(f"{text} lr {lr:.1e} {self.rate:.1f} img/s {extra}".strip(), refresh=False)
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n in (1, self.total):
            print(f"{self.stage} {self.n}/{self.total} {text} lr {lr:.2e} {self.rate:.1f} img/s {extra}".rstrip(),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SkipBatches:
    """A batch sampler's batches from position `start` on: a resumed epoch continues where it stopped."""

    def __init__(self, batches: Iterable[list[int]], start: int = 0) -> None:
        self.batches, self.start = list(batches), start

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

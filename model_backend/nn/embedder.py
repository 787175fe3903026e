"""The embedding model: weights file in, L2-normalised vectors out.

Everything downstream (index, query, training) depends only on `EmbeddingModel.embed` and the
metadata it carries (input size, normalisation, dimension, weights sha256), so the backbone can
change — ImageNet MobileNetV2 today, a trained CDIKTNet later — without touching the rest.
The metadata travels with the weights (safetensors header), as a peer plugin does with ONNX
metadata, so an index always knows which preprocessing produced it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from model_backend.core.dist import resolve_device
from model_backend.core.errors import InputError
from model_backend.nn.architectures import create_net
from model_backend.nn.runtime import scale_shift
from model_backend.nn.weights import ModelMeta, default_weights_path, read_weights

if TYPE_CHECKING:
    from model_backend.nn.runtime import Runner

log = logging.getLogger(__name__)

class EmbeddingModel:
    """Load weights once, then `embed` batches of normalised images."""

    def __init__(self, net: nn.Module, meta: ModelMeta, device: torch.device) -> None:
        self.net = net.eval().to(device)
        self.meta = meta
        self.device = device
        self.runner: Runner | None = None
        """A CPU inference runtime (model_backend.nn.runtime) running the same graph; None: PyTorch."""
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
        state, meta = read_weights(path)
        net = create_net(state, meta, path.name)
        log.info("Loaded %s (%s, %s) on %s", path.name, meta.architecture, meta.weights_sha256[:12], dev)
        model = cls(net, meta, dev)
        model.set_runtime(runtime, threads)
        return model

    def set_runtime(self, runtime: str = "auto", threads: int | None = None) -> str:
        """Pick the engine that runs `embed` ('auto', 'torch', 'openvino', 'onnxruntime'); returns the one in use.

        Embeddings agree across runtimes (checked when the runner is made), so indexes built by
        one are queried by another: the index key does not depend on it, the manifest records it.
        """
        from model_backend.nn.runtime import RuntimeSpec
        from model_backend.nn.runtime_select import select_runner

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

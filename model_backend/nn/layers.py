"""Network parts shared by the embedders: ImageNet normalisation, GeM pooling, the MobileNetV2 embedder."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        from model_backend.nn.mobilenet import mobilenet_v2_features

        self.features = mobilenet_v2_features()
        self.pool: nn.Module = GeM() if pooling == "gem" else nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(self.features(x)).flatten(1)
        return nn.functional.normalize(f.float(), dim=1)

"""MobileNetV2's feature extractor (Sandler et al., 2018), written out here so that loading the default
model never imports torchvision.

Importing torchvision costs ~2.5 s on the development CPU (its `ops` import `torch._dynamo`), which every
CLI run, every Processing run and QGIS's first Locate paid before doing any work, and inside QGIS it is
also what drags triton in (see `cdikt_qgis/bootstrap.py`). The modules' names and shapes are those of
`torchvision.models.mobilenet_v2().features`, so its state dicts, the deep-sort default weights and every
saved CDIKTNet model load unchanged; `tests/backend/test_cdiktnet_model.py` checks both give the same
embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""(expansion, output channels, repeats, stride of the first repeat) of the inverted-residual stages."""
STEM, LAST = 32, 1280


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution, batch norm, ReLU6 as one Sequential (the key layout `N.0.weight`, `N.1.running_mean`)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear); the input is added back where the shape
    allows, so a block can learn to do nothing."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """The 19 feature blocks (stride 32, 1280 channels), initialised as torchvision does (for training from
    scratch; a loaded state dict replaces all of it)."""
    blocks: list[nn.Module] = [_conv_bn_relu6(3, STEM, 3, 2)]
    cin = STEM
    for expansion, cout, repeats, stride in _BLOCKS:
        for i in range(repeats):
            blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    blocks.append(_conv_bn_relu6(cin, LAST, 1))
    features = nn.Sequential(*blocks)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features

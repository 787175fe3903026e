"""CDIS, the cross-domain invariance sub-network: the network CDIKTNet trains on paired images.

One backbone embeds both views. On top of its last-stage map sit the two invariance heads:
- structural: a multi-dilation residual block whose pooled part features, and the pooled global
  vector, must each classify the location — so the features describe the place's layout at
  several receptive-field sizes, which survives the drone's oblique, rotated view;
- spatial: the map's tokens, re-weighted by a learned temperature-0.1 token attention and fused
  back with themselves, must agree between a drone photo and its satellite tile (cosine), pulling
  the two views' spatial descriptions into one space.
Both heads exist only for training: retrieval (and `EmbeddingModel`) uses the L2-normalised pooled
vector alone, so the shipped weights are the backbone's and inference costs nothing extra.
The template is MEAN (Chen et al., the same first author); see METHOD.md for the facts used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_backend.core.errors import InputError
from model_backend.nn.cdiktnet.backbone import DEFAULT_BACKBONE, Backbone, build_backbone, load_state_strict
from model_backend.nn.weights import DIGEST_KEY, tensors_digest

ARCHITECTURE = "cdiktnet"
INFERENCE_PREFIX = "backbone."


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MultiDilationBlock(nn.Module):
    """Three 3x3 convs C→C/4 at dilation 1, 2, 3, averaged, ReLU, 1x1 back to C; output (block + input)/2.

    The three dilations see the same place at three context sizes; averaging the residual with
    the input keeps the backbone's feature scale, so the pooled parts stay comparable to it.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(1, channels // reduction)
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, mid, kernel_size=3, padding=d, dilation=d, bias=False) for d in (1, 2, 3))
        self.expand = nn.Conv2d(mid, channels, kernel_size=1)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.stack([b(x) for b in self.branches]).mean(dim=0)
        return (self.expand(F.relu(mixed)) + x) / 2


class MultiScaleFusion1d(nn.Module):
    """MEAN's 'multi-scale 1-D conv fusion': the vector read as a 1-channel sequence, dilated 1-D
    convs (and one 1x1 + ReLU) each giving out/4 channels, averaged over the sequence.

    Kept as an option for fidelity; note it sees only the distribution of the vector's values
    (average over positions), not which channel holds which value, so it is a weak classifier.
    """

    def __init__(self, out_dim: int = 512) -> None:
        super().__init__()
        q = out_dim // 4
        self.dilated = nn.ModuleList(nn.Conv1d(1, q, kernel_size=3, dilation=d, padding=d) for d in (1, 2, 3))
        self.point = nn.Conv1d(1, out_dim - 3 * q, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.unsqueeze(1)
        out = torch.cat([b(s) for b in self.dilated] + [F.relu(self.point(s))], dim=1)
        return out.mean(dim=-1)


class ClassifierHead(nn.Module):
    """Pooled feature → fusion to 512 → BN → dropout 0.5 → linear to the locations.

    'linear' fusion (default) is the usual bottleneck of the LPN/FSRA family and lets each class
    depend on every channel; 'multiscale' is MEAN's variant (see `MultiScaleFusion1d`).
    """

    def __init__(self, in_dim: int, n_classes: int, bottleneck: int = 512, dropout: float = 0.5,
                 fusion: str = "linear") -> None:
        super().__init__()
        if fusion == "linear":
            self.fusion: nn.Module = nn.Linear(in_dim, bottleneck)
        elif fusion == "multiscale":
            self.fusion = MultiScaleFusion1d(bottleneck)
        else:
            raise ValueError(f"Unknown head fusion {fusion!r}; use 'linear' or 'multiscale'.")
        self.bn = nn.BatchNorm1d(bottleneck)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(bottleneck, n_classes)
        _kaiming(self)
        nn.init.normal_(self.classifier.weight, std=0.001)  # start near uniform: CE begins at log(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.bn(self.fusion(x))))


class SpatialAlignment(nn.Module):
    """Last-stage map → fused tokens (B, fused_dim, h*w) to be aligned across views.

    Tokens pass an MLP C→2C→token_dim (1-D convs, BN, ReLU), are L2-normalised over channels and
    turned into per-channel attention over the tokens by a temperature-0.1 softmax; the attention
    is fused with the original tokens (1x1 projections, concatenation, 1x1, BN, ReLU). The sharp
    softmax makes each channel pick a few distinctive places, which both views must agree on.
    """

    def __init__(self, channels: int, token_dim: int = 256, fused_dim: int = 512, temperature: float = 0.1,
                 dropout: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature
        self.mlp = nn.Sequential(
            nn.Conv1d(channels, 2 * channels, 1, bias=False), nn.BatchNorm1d(2 * channels), nn.ReLU(inplace=True),
            nn.Conv1d(2 * channels, token_dim, 1, bias=False), nn.Dropout(dropout))
        self.attn = nn.Conv1d(token_dim, token_dim, 1)
        self.proj_tokens = nn.Conv1d(channels, fused_dim, 1)
        self.proj_attn = nn.Conv1d(token_dim, fused_dim, 1)
        self.fuse = nn.Sequential(nn.Conv1d(2 * fused_dim, fused_dim, 1), nn.BatchNorm1d(fused_dim),
                                  nn.ReLU(inplace=True))
        _kaiming(self)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = fmap.flatten(2)
        w = F.normalize(self.mlp(tokens), dim=1)
        w = torch.softmax(self.attn(w).float() / self.temperature, dim=2).to(tokens.dtype)
        return self.fuse(torch.cat([self.proj_tokens(tokens), self.proj_attn(w)], dim=1))


@dataclass
class CDISOutput:
    """Everything the CDIS losses need from one batch of drone/satellite pairs."""

    drone_pooled: torch.Tensor  # (B, C), not normalised
    sat_pooled: torch.Tensor
    drone_logits: list[torch.Tensor] = field(default_factory=list)  # n_parts + 1 heads, (B, n_classes) each
    sat_logits: list[torch.Tensor] = field(default_factory=list)
    drone_tokens: torch.Tensor | None = None  # (B, fused_dim, h*w)
    sat_tokens: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None  # exp of the learnable log scale, for InfoNCE


class CDIKTNet(nn.Module):
    """Shared backbone + CDIS heads. `forward(x)` = retrieval embedding; `forward(drone, sat)` = training.

    Training goes through `forward` too (not only `forward_train`) so that DistributedDataParallel,
    which hooks `forward`, sees every step; the CDTS stage calls `forward(x)` in train mode.
    `n_classes` = 0 builds no classifier heads (unpaired stages, or no location labels).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, n_classes: int = 0,
                 pretrained_state: Mapping[str, torch.Tensor] | None = None, *, pooling: str | None = None,
                 n_parts: int = 2, part_dropout: float = 0.01, head_fusion: str = "linear", token_dim: int = 256,
                 fused_dim: int = 512, attention_temperature: float = 0.1,
                 logit_scale_init: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        net, dim, stride, size = build_backbone(backbone, pretrained_state, pooling)
        self.backbone: Backbone = net
        self.feat_dim, self.map_stride, self.input_size = dim, stride, size
        self.n_classes, self.n_parts = n_classes, n_parts
        # Without location labels the structural branch has nothing to learn from: not built at all,
        # so DDP sees no unused parameters and checkpoints stay small.
        self.structural = MultiDilationBlock(dim) if n_classes else None
        self.part_dropout = nn.Dropout(part_dropout)
        heads = [ClassifierHead(dim, n_classes, fusion=head_fusion) for _ in range(n_parts + 1)] if n_classes else []
        self.heads = nn.ModuleList(heads)  # n_parts part heads, then the global head
        self.alignment = SpatialAlignment(dim, token_dim, fused_dim, attention_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def set_n_classes(self, n_classes: int, head_fusion: str = "linear") -> None:
        """Rebuild the classifier heads for another number of locations (e.g. a new dataset).

        The structural block is kept when it exists (it learns layout, not locations); with
        n_classes = 0 heads and block are dropped.
        """
        dev = self.logit_scale.device
        self.n_classes = n_classes
        if n_classes and self.structural is None:
            self.structural = MultiDilationBlock(self.feat_dim).to(dev)
        heads = [ClassifierHead(self.feat_dim, n_classes, fusion=head_fusion) for _ in range(self.n_parts + 1)]
        self.heads = nn.ModuleList(heads if n_classes else []).to(dev)
        if not n_classes:
            self.structural = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, C) L2-normalised retrieval vectors (float32)."""
        return F.normalize(self.backbone(x)[1].float(), dim=1)

    def forward(self, x: torch.Tensor, sat: torch.Tensor | None = None) -> torch.Tensor | CDISOutput:
        if sat is None:
            return self.embed(x)
        return self.forward_train(x, sat)

    def forward_train(self, drone: torch.Tensor, sat: torch.Tensor) -> CDISOutput:
        """Both views through the shared backbone and the CDIS heads.

        Same-sized views go through everything as one batch: half the passes, and BatchNorm
        statistics taken over both views, which is what one shared embedding space wants.
        """
        b = drone.shape[0]
        if drone.shape[1:] == sat.shape[1:]:
            fmap, pooled = self.backbone(torch.cat([drone, sat]))
            logits = self._heads(fmap, pooled)
            tokens = self.alignment(fmap)
            return CDISOutput(drone_pooled=pooled[:b], sat_pooled=pooled[b:], drone_logits=[lg[:b] for lg in logits],
                              sat_logits=[lg[b:] for lg in logits], drone_tokens=tokens[:b], sat_tokens=tokens[b:],
                              logit_scale=self.logit_scale.exp())
        (fd, pd), (fs, ps) = self.backbone(drone), self.backbone(sat)
        return CDISOutput(drone_pooled=pd, sat_pooled=ps, drone_logits=self._heads(fd, pd),
                          sat_logits=self._heads(fs, ps), drone_tokens=self.alignment(fd),
                          sat_tokens=self.alignment(fs), logit_scale=self.logit_scale.exp())

    def _heads(self, fmap: torch.Tensor, pooled: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the part heads (each on its own dropout view of the structural block) and the global head.

        The parts share one multi-dilation block, as in MEAN; independent dropout masks keep the
        part heads from co-adapting to the same channels.
        """
        if self.structural is None:
            return []
        block = self.structural(fmap)
        feats = [self.part_dropout(block).mean(dim=(-2, -1)) for _ in range(self.n_parts)] + [pooled]
        return [head(f) for head, f in zip(self.heads, feats)]

    def inference_meta(self) -> dict[str, Any]:
        """What `EmbeddingModel` needs to rebuild the inference part (see `save_inference_weights`)."""
        bb = self.backbone
        return {"architecture": ARCHITECTURE, "backbone": bb.name, "input_size": self.input_size,
                "mean": list(bb.mean), "std": list(bb.std), "dim": self.feat_dim, "pooling": bb.pooling}


class InferenceNet(nn.Module):
    """The part of CDIKTNet kept for retrieval: backbone + pooling + L2 normalisation."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x)[1].float(), dim=1)


def save_inference_weights(model: CDIKTNet, path: str | Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the backbone's tensors (keys 'backbone.*') and a `cdikt_meta` header to a .safetensors file.

    Only the inference part is saved: the heads serve training alone, and leaving them out keeps
    the shipped file small. `meta` entries override the model's own (e.g. a different input_size
    chosen at training time). Returns the metadata written.
    """
    from safetensors.torch import save_file

    net = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
    full = {**net.inference_meta(), **(dict(meta) if meta else {})}
    full = {k: v for k, v in full.items() if k not in ("weights_sha256", "weights_name")}
    state = net.backbone.state_dict()
    tensors = {INFERENCE_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"cdikt_meta": json.dumps(full), DIGEST_KEY: tensors_digest(tensors)})
    return full


def load_inference_net(state: Mapping[str, torch.Tensor], backbone: str, pooling: str,
                       dim: int | None = None) -> InferenceNet:
    """Rebuild the retrieval network from a saved inference state (`EmbeddingModel.load` calls this).

    Raises InputError when the backbone is unknown, the tensors do not fit it, or the recorded
    dimension disagrees with the backbone's (an index would otherwise store vectors of the wrong size).
    """
    if not backbone:
        raise InputError("the cdikt_meta header names no backbone; save with save_inference_weights().")
    own = {k.removeprefix(INFERENCE_PREFIX): v for k, v in state.items()}
    net, feat_dim, _, _ = build_backbone(backbone, None, pooling)
    if dim is not None and dim != feat_dim:
        raise InputError(f"cdikt_meta says dim {dim} but backbone {backbone} gives {feat_dim}; wrong header?")
    load_state_strict(net, own, backbone)
    return InferenceNet(net)

"""The shared backbone: one network embeds drone photos and satellite tiles alike.

CDIKTNet needs two things from every image: the last-stage feature map (for the structural and
spatial invariance heads, which look at where things are) and one pooled vector (the retrieval
embedding, the only thing inference keeps). `build_backbone` hides how each family produces them,
so the heads, the losses and `EmbeddingModel` treat a ConvNeXt, a ResNet or the CPU-friendly
MobileNetV2 the same way.

Nothing here downloads: timm models are created with `pretrained=False` and weights come only
from a state dict the caller read from a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from model_backend.core.errors import InputError
from model_backend.nn.layers import IMAGENET_MEAN, IMAGENET_STD, GeM
from model_backend.nn.weights import map_deepsort_keys

TORCHVISION_MOBILENET = "mobilenet_v2"
DEFAULT_BACKBONE = "convnext_tiny"
# The paper family trains ConvNeXt at 384 px; timm's own configs say 224, which would silently
# shrink the 12x12 last-stage map the heads were designed around.
_INPUT_SIZE_OVERRIDES = {"convnext_tiny": 384, "convnext_small": 384, "convnext_base": 384, TORCHVISION_MOBILENET: 224}
POOLINGS = ("gem", "avg", "timm_head")


class Backbone(nn.Module):
    """Image batch → (last-stage map (B, C, h, w), pooled vector (B, C)).

    `pooled` is not normalised: CDIS's losses and the classifier heads want the raw vector;
    `CDIKTNet.forward` and `EmbeddingModel` L2-normalise it for retrieval.
    """

    name: str
    pooling: str
    feat_dim: int
    map_stride: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


class MobileNetV2Backbone(Backbone):
    """MobileNetV2 `features` (`nn.mobilenet`, torchvision's layout) + GeM: the same graph as
    `layers.MobileNetV2Embedder`.

    Same module names (`features.*`) and same pooling, so the default deep-sort weights give the
    same embeddings here as in the engine's default model, bit for bit.
    """

    def __init__(self, pooling: str = "gem") -> None:
        super().__init__()
        from model_backend.nn.mobilenet import mobilenet_v2_features

        if pooling not in ("gem", "avg"):
            raise InputError(f"MobileNetV2 supports pooling 'gem' or 'avg', not {pooling!r}.")
        self.features = mobilenet_v2_features()
        self.pool: nn.Module = GeM() if pooling == "gem" else nn.AdaptiveAvgPool2d(1)
        self.name, self.pooling, self.feat_dim, self.map_stride = TORCHVISION_MOBILENET, pooling, 1280, 32
        self.input_size, self.mean, self.std = 224, IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        return fmap, self.pool(fmap).flatten(1)

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> None:
        clean = _strip_prefixes(state, ("backbone.", "module.", "model.", "features."))
        target = self.features.state_dict()
        if not all(k in target for k in clean):  # the deep-sort file's flat layout
            clean = map_deepsort_keys(dict(clean), target)
        load_state_strict(self.features, clean, TORCHVISION_MOBILENET)


class TimmBackbone(Backbone):
    """Any timm image model whose `forward_features` yields a spatial map (CNNs) or patch tokens (ViTs).

    With pooling 'timm_head' the pooled vector is the model's own pre-logits head output; for
    ConvNeXt that is the LayerNorm'd global average the paper family retrieves with.
    """

    def __init__(self, name: str, pooling: str = "timm_head") -> None:
        super().__init__()
        import timm

        if pooling not in POOLINGS:
            raise InputError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise InputError(f"Unknown backbone {name!r} ({exc}); use a timm model name or 'mobilenet_v2'.") from None
        self.gem = GeM()
        self.name, self.pooling = name, pooling
        self.feat_dim = int(self.model.num_features)
        info = getattr(self.model, "feature_info", None)
        self.map_stride = int(info[-1]["reduction"]) if info else 32
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.input_size = _INPUT_SIZE_OVERRIDES.get(name, int((cfg.get("input_size") or (3, 224, 224))[-1]))
        self.mean = _triple(cfg.get("mean", IMAGENET_MEAN))
        self.std = _triple(cfg.get("std", IMAGENET_STD))
        self.nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")  # e.g. Swin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(x)
        fmap = self.to_map(out)
        if self.pooling == "gem":
            return fmap, self.gem(fmap).flatten(1)
        if self.pooling == "avg":
            return fmap, fmap.mean(dim=(-2, -1))
        return fmap, self.model.forward_head(out, pre_logits=True)

    def to_map(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() == 3:  # ViT-style tokens (B, prefix + h*w, C) → (B, C, h, w)
            patches = out[:, int(getattr(self.model, "num_prefix_tokens", 0)):]
            b, n, c = patches.shape
            side = math.isqrt(n)
            if side * side != n:
                raise InputError(f"Backbone {self.name} gives {n} patch tokens, not a square grid; use a CNN.")
            return patches.transpose(1, 2).reshape(b, c, side, side)
        return out.permute(0, 3, 1, 2) if self.nhwc else out

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> None:
        clean = _strip_prefixes(state, ("backbone.", "module.", "model."))
        own = self.model.state_dict()
        # Classifier weights of an ImageNet checkpoint have no place in a num_classes=0 model.
        clean = {k: v for k, v in clean.items() if k in own or not k.startswith(("head.fc.", "fc.", "classifier."))}
        load_state_strict(self.model, clean, self.name)


def _triple(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            k = k.removeprefix(p)
        out[k] = v
    return out


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), type(exc).__name__)
        raise InputError(f"Weights do not fit backbone {name} ({detail[:160]}); wrong file?") from None


def build_backbone(name: str = DEFAULT_BACKBONE, pretrained_state: Mapping[str, torch.Tensor] | None = None,
                   pooling: str | None = None) -> tuple[Backbone, int, int, int]:
    """Create a backbone by name and optionally load a state dict into it.

    Returns (module, feat_dim, map_stride, default_input_size). `name` is 'mobilenet_v2'
    (torchvision; accepts the deep-sort default weights) or any timm model name. `pooling`
    defaults to 'gem' for MobileNetV2 (the engine's default) and 'timm_head' for timm models.
    """
    if name == TORCHVISION_MOBILENET:
        net: Backbone = MobileNetV2Backbone(pooling or "gem")
    else:
        net = TimmBackbone(name, pooling or "timm_head")
    if pretrained_state is not None:
        net.load_pretrained(pretrained_state)
    return net, net.feat_dim, net.map_stride, net.input_size


def default_backbone_state(name: str) -> dict[str, torch.Tensor] | None:
    """The offline starting weights for `name`: the engine's default file for MobileNetV2, else None.

    timm weights are never fetched; a user who wants ImageNet ConvNeXt weights passes a file.
    """
    if name != TORCHVISION_MOBILENET:
        return None
    from model_backend.nn.weights import imagenet_weights_path, read_weights

    path = imagenet_weights_path()  # ImageNet, not the shipped CDIKTNet: training starts from here
    if not path.exists():
        raise InputError(f"Default weights missing ({path}). Run `make setup` to install them.")
    state, _ = read_weights(path)
    return state

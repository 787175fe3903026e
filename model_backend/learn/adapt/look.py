"""Which colours to trust: an adapted model may drop colour and see luminance only.

Across years and seasons a field's colour is the least reliable thing about it: crops rotate,
so one field is green in one year and bare brown in the next, while its boundary, the roads and
the shores stay. Colour jitter in training teaches a model to discount global casts, but not to
ignore that fields swap colours one by one. Seeing luminance only does, at no cost: the grey
image is a linear function of RGB, so "feed the network grey" folds exactly into the weights of
its first convolution (`fold_luminance`). The adapted model keeps its architecture, its file
format and its one preprocessing; index, query and runtime exports need no change.

Whether to drop colour is the analyst's imagery's question, so `choose_look` asks the labelled
training pairs (never the held-out ones): the look under which the current model ranks each
training photo's true crop higher among raster tiles wins; a tie keeps colour. On the NAIP
cross-year benchmark luminance ranked the true places better before any training on every seed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model_backend.core.config import ADAPT_LOOKS
from model_backend.core.errors import InputError
from model_backend.geo.exif import load_photo
from model_backend.geo.geodesy import metres_per_unit
from model_backend.learn.adapt.data import normalise, raster_tile
from model_backend.learn.labels import ResolvedLabel
from model_backend.locate.query import rotation_crops
from model_backend.nn.cdiktnet import CDIKTNet

log = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights: the grey the fold computes."""
LOOKS = ADAPT_LOOKS


def _first_conv(model: CDIKTNet) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The first convolution on the 3 input bands, and the BatchNorm right after it if it has no bias."""
    modules = list(model.backbone.modules())
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            if m.bias is not None:
                return m, None
            bn = next((n for n in modules[i + 1:] if isinstance(n, nn.BatchNorm2d)), None)
            if bn is None or bn.num_features != m.out_channels:
                break
            return m, bn
    raise InputError(f"Cannot drop colour from a {model.backbone.name}: its first layer is not a convolution "
                     "on 3 bands with a bias or a BatchNorm after it. Use look 'colour'.")


@torch.no_grad()
def fold_luminance(model: CDIKTNet) -> CDIKTNet:
    """Rewrite the first convolution so the model sees only the luminance of its RGB input.

    With x_c normalised as (v_c − m_c) / s_c and grey g = Σ w_c v_c on every band, the first
    convolution gives Σ_ij S_ij g_ij − K with S = Σ_c W_c / s_c and K = Σ W_c m_c / s_c. The same
    is W'_c = w_c s_c S on the RGB input, up to a constant per output channel, which goes into the
    conv's bias or the running mean of the BatchNorm after it. Exact away from the border (zero
    padding differs), idempotent, in place.
    """
    conv, bn = _first_conv(model)
    w = conv.weight
    mean = torch.tensor(model.backbone.mean, dtype=w.dtype).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std, dtype=w.dtype).view(1, 3, 1, 1)
    luma = torch.tensor(LUMA, dtype=w.dtype).view(1, 3, 1, 1)
    s = (w / std).sum(dim=1, keepdim=True)
    k = (w * mean / std).sum(dim=(1, 2, 3))
    delta = s.sum(dim=(1, 2, 3)) * float((luma * mean).sum()) - k
    w.copy_(luma * s * std)
    if bn is None:
        conv.bias.add_(delta)
    else:
        bn.running_mean.sub_(delta)
    return model


def sees_luminance(model: CDIKTNet) -> bool:
    """Whether the model already ignores colour (an adapted model adapted again)."""
    try:
        conv, _ = _first_conv(model)
    except InputError:
        return False
    w = conv.weight.detach()
    std = torch.tensor(model.backbone.std, dtype=w.dtype).view(1, 3, 1, 1)
    luma = torch.tensor(LUMA, dtype=w.dtype).view(1, 3, 1, 1)
    per_band = w / (luma * std)  # equal across the 3 bands iff the conv reads luminance only
    return bool(torch.allclose(per_band[:, :1].expand_as(per_band), per_band, rtol=1e-4, atol=1e-6))


@dataclass(frozen=True)
class LookChoice:
    """What was chosen, and the mean reciprocal rank of the training pairs under each look."""

    look: str
    scores: dict[str, float]
    inherited: bool = False

    def describe(self) -> str:
        if self.look == "luminance":
            how = "kept from the starting model" if self.inherited else "the training pairs matched better without it"
            return f"colour dropped: the first convolution sees luminance only ({how})"
        return "colour kept"


@torch.no_grad()
def _embed(model: CDIKTNet, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    bb = model.backbone
    return torch.cat([model.embed(normalise(list(images[i:i + batch]), bb.mean, bb.std))
                      for i in range(0, len(images), batch)])


def choose_look(model: CDIKTNet, raster: str, train: list[ResolvedLabel], distractors: list[tuple[float, float]],
                crs_wkt: str, rotations: int = 8) -> LookChoice:
    """Rank each training photo's true crop among `distractors` (raster points) under both looks.

    Photos are queried as `locate` queries them (the central square at `rotations` headings, the
    best per tile), so the choice reflects what the analyst will see. Distractors within one
    footprint of a photo's label are not counted against it.
    """
    if sees_luminance(model):
        return LookChoice("luminance", {}, inherited=True)
    size = model.input_size
    side = float(np.median([lb.side_m for lb in train]))
    gallery = [np.asarray(raster_tile(raster, lb.cx, lb.cy, lb.side_m, size)[0]) for lb in train]
    gallery += [np.asarray(raster_tile(raster, x, y, side, size)[0]) for x, y in distractors]
    crops = [rotation_crops(load_photo(str(lb.photo)), rotations, size) for lb in train]
    pts = np.array([(lb.cx, lb.cy) for lb in train] + list(distractors), dtype=np.float64)
    scores: dict[str, float] = {}
    for look in ("colour", "luminance"):
        net = model if look == "colour" else fold_luminance(copy.deepcopy(model))
        tiles = _embed(net, np.stack(gallery))
        reciprocal = []
        for i, (lb, c) in enumerate(zip(train, crops)):
            sims = (tiles @ _embed(net, c).T).max(dim=1).values.numpy()
            mx, my = metres_per_unit(crs_wkt, lb.cx, lb.cy)
            near = np.hypot((pts[:, 0] - lb.cx) * mx, (pts[:, 1] - lb.cy) * my) <= lb.side_m
            near[i] = False
            rank = 1 + int(np.sum(sims[~near] > sims[i]))
            reciprocal.append(1.0 / rank)
        scores[look] = round(float(np.mean(reciprocal)), 4)
    look = "luminance" if scores["luminance"] > scores["colour"] else "colour"
    log.info("Look chosen on %d training pairs: %s (mean reciprocal rank %s)", len(train), look, scores)
    return LookChoice(look, scores)

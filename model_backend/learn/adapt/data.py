"""What few-shot adaptation trains on: augmented views, cut once, pushed once through the frozen trunk.

On a CPU the only affordable way to fine-tune in minutes is to train a light part of the network
(the last stage and the pooling) and to run everything below it once: each augmented view goes
through the frozen trunk a single time, and training then iterates over the cached trunk maps
(a few KB each). So augmentation is drawn up front — `views_per_pair` versions of every pair and
`views_per_tile` of every unlabelled tile — instead of fresh at every step.

The views follow what the query will see: a labelled photo is turned north-up by its label's
heading (the query's rotation search gets within half a rotation step of that, so a rotation
jitter of that size is added), its central square is the footprint, and the raster crop at the
label's centre is read exactly as the indexer reads tiles. Strong colour jitter, random grey and
blur are applied to every view, because the domain shift adaptation exists for is mostly the
look of the imagery (season, sensor, year), not its geometry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch import nn

from model_backend.core.errors import Cancelled
from model_backend.geo.exif import load_photo
from model_backend.geo.reader import FILL_RGB
from model_backend.learn.datasets.raster_pairs import satellite_crop
from model_backend.learn.labels import ResolvedLabel
from model_backend.locate.priors import north_up
from model_backend.nn.cdiktnet.backbone import Backbone, MobileNetV2Backbone, TimmBackbone

_FILL = tuple(int(v) for v in FILL_RGB)


@dataclass(frozen=True)
class ViewAugment:
    """Strength of the up-front augmentation (drone views get `strength` 1, raster tiles `tile_strength`)."""

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.5
    hue_deg: float = 60.0
    p_grey: float = 0.3
    p_blur: float = 0.3
    scale_jitter: float = 0.1
    shift_jitter: float = 0.05
    tile_strength: float = 0.5
    """Colour jitter of a pair's raster crop: milder than the photo's, whose look is what differs."""
    p_part: float = 0.5
    """Share of pair views showing a part of the footprint (see `ViewMaker.sub_pair`)."""
    min_part: float = 0.5
    """Smallest part, as a fraction of the footprint's side."""


class TrunkHead(nn.Module):
    """A backbone split in two: `trunk` (frozen, run once per view) and `head` (trained), same output.

    `head(trunk(x))` equals the backbone's pooled vector, so the saved inference weights are just
    the backbone's with the head's tensors changed.
    """

    def __init__(self, backbone: Backbone, trunk: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
                 trained: list[nn.Module], description: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.trunk = trunk
        self._head = head
        self.trained = nn.ModuleList(trained)
        self.description = description

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(x)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for m in self.trained for p in m.parameters()]

    def train_head(self) -> None:
        """Train mode for the head, but BatchNorm keeps its running statistics: a batch of ten pairs
        would give noisy statistics, and the index is built in eval mode anyway."""
        self.trained.train()
        for m in self.trained.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def split_backbone(backbone: Backbone, part: str = "last_stage") -> TrunkHead:
    """Split into a frozen trunk and a trained head; `part` = 'last_stage' or 'last_block'.

    MobileNetV2 'last_stage': its last two modules (the 160→320 inverted residual and the 1x1
    conv to 1280) and the pooling; 'last_block': the 1x1 conv alone, i.e. a learned projection of
    the last map before pooling. timm models with `stages` (ConvNeXt, ...): the last stage.
    """
    if part not in ("last_stage", "last_block"):
        raise ValueError(f"Unknown adapted part {part!r}; use 'last_stage' or 'last_block'.")
    for p in backbone.parameters():
        p.requires_grad_(False)
    if isinstance(backbone, MobileNetV2Backbone):
        feats = backbone.features
        k = len(feats) - (1 if part == "last_block" else 2)
        trained = list(feats[k:])
        what = ("MobileNetV2's last 1x1 conv (a projection of the last map to 1280-d) and GeM pooling"
                if part == "last_block" else
                "MobileNetV2's last stage (last inverted residual + 1x1 conv to 1280-d) and GeM pooling")

        def mobile_head(x: torch.Tensor) -> torch.Tensor:
            for m in trained:
                x = m(x)
            return backbone.pool(x).flatten(1)

        trunk: nn.Module = feats[:k]
        head = mobile_head
    elif isinstance(backbone, TimmBackbone) and hasattr(backbone.model, "stages"):
        model = backbone.model
        stages = list(model.stages)
        trained = [stages[-1], *(m for m in (getattr(model, "norm_pre", None), getattr(model, "head", None))
                                 if isinstance(m, nn.Module))]
        trunk = nn.Sequential(model.stem, *stages[:-1])
        what = f"{backbone.name}'s last stage and head"

        def timm_head(x: torch.Tensor) -> torch.Tensor:
            out = stages[-1](x)
            if isinstance(getattr(model, "norm_pre", None), nn.Module):
                out = model.norm_pre(out)
            fmap = backbone.to_map(out)
            if backbone.pooling == "gem":
                return backbone.gem(fmap).flatten(1)
            if backbone.pooling == "avg":
                return fmap.mean(dim=(-2, -1))
            return model.forward_head(out, pre_logits=True)

        head = timm_head
    else:
        raise ValueError(f"Adapting backbone {backbone.name} on CPU is not supported; use MobileNetV2 or ConvNeXt.")
    for m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    return TrunkHead(backbone, trunk.eval(), head, trained, what)


class ViewMaker:
    """Seeded augmentation of photos and raster crops into model-sized uint8 squares."""

    def __init__(self, size: int, rng: np.random.Generator, aug: ViewAugment = ViewAugment(),
                 rotation_jitter_deg: float = 22.5) -> None:
        self.size, self.rng, self.aug, self.rot_jitter = size, rng, aug, rotation_jitter_deg

    def colour(self, img: Image.Image, strength: float) -> Image.Image:
        a, g = self.aug, self.rng
        for enhance, amount in ((ImageEnhance.Brightness, a.brightness), (ImageEnhance.Contrast, a.contrast),
                                (ImageEnhance.Color, a.saturation)):
            img = enhance(img).enhance(float(g.uniform(1 - amount * strength, 1 + amount * strength)))
        shift = int(round(g.uniform(-a.hue_deg, a.hue_deg) * strength / 360.0 * 255.0))
        if shift:
            h, s, v = img.convert("HSV").split()
            img = Image.merge("HSV", (h.point(lambda x: (x + shift) % 256), s, v)).convert("RGB")
        if g.random() < a.p_grey * strength:
            img = ImageOps.grayscale(img).convert("RGB")
        if g.random() < a.p_blur:
            img = img.filter(ImageFilter.GaussianBlur(float(g.uniform(0.3, 1.5))))
        return img

    def _geometry(self) -> tuple[int, bool]:
        return int(self.rng.integers(0, 4)), bool(self.rng.random() < 0.5)

    @staticmethod
    def _turn(img: Image.Image, quarter: int, flip: bool) -> Image.Image:
        if flip:
            img = ImageOps.mirror(img)
        return img.rotate(90 * quarter) if quarter else img

    def photo_square(self, photo: Image.Image, angle_deg: float, scale: float = 1.0,
                     offset: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
        """A square of `scale` x the photo's short side, its centre `offset` (x right, y down, in short
        sides) from the photo's centre, turned by `angle_deg` + jitter about that centre; small scale
        and place jitter on top."""
        a, g = self.aug, self.rng
        w, h = photo.size
        short = min(w, h)
        side = short * scale * float(g.uniform(1 - a.scale_jitter, 1.0))
        cx = w / 2 + (offset[0] + float(g.uniform(-a.shift_jitter, a.shift_jitter))) * short
        cy = h / 2 + (offset[1] + float(g.uniform(-a.shift_jitter, a.shift_jitter))) * short
        angle = angle_deg + float(g.uniform(-self.rot_jitter, self.rot_jitter))
        img = photo.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=_FILL)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        return img.crop(box).resize((self.size, self.size), Image.Resampling.BILINEAR)

    def sub_pair(self, photo: Image.Image, read_tile: Callable[[float, float, float], Image.Image]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (drone, raster) pair, possibly of a part of the footprint.

        A labelled pair is exact at every scale: the part of the north-up photo `offset` from its
        centre shows the ground `offset` footprints from the label's centre, so each label yields
        many distinct sub-pairs (`read_tile(dx, dy, scale)` reads that raster crop, dx east and dy
        south in footprint sides). Same quarter turn and mirror on both views, so they stay aligned.
        """
        a, g = self.aug, self.rng
        scale = float(g.uniform(a.min_part, 1.0)) if g.random() < a.p_part else 1.0
        off = tuple(float(g.uniform(-(1 - scale) / 2, (1 - scale) / 2)) for _ in range(2))
        quarter, flip = self._geometry()
        d = self.colour(self._turn(self.photo_square(photo, 0.0, scale, (off[0], off[1])), quarter, flip), 1.0)
        s = self.colour(self._turn(read_tile(off[0], off[1], scale), quarter, flip), self.aug.tile_strength)
        return np.asarray(d), np.asarray(s)

    def tile(self, tile: Image.Image) -> np.ndarray:
        """An unlabelled raster tile, any quarter turn and full colour jitter: same place, new look."""
        quarter, flip = self._geometry()
        return np.asarray(self.colour(self._turn(tile, quarter, flip), 1.0))

    def loose_photo(self, photo: Image.Image) -> np.ndarray:
        """An unlabelled photo: heading unknown, so any rotation."""
        return np.asarray(self.colour(self.photo_square(photo, float(self.rng.uniform(0, 360))), 1.0))

    def styled_pair(self, tile: Image.Image, looks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A raster tile dressed in a photo's look (its colour histograms) and the tile itself: a pair
        of a place nobody labelled. The photos' look is what differs between the domains, so a few
        photos lend it to every tile of the raster (see `match_histograms`)."""
        quarter, flip = self._geometry()
        base = self._turn(tile, quarter, flip)
        look = looks[int(self.rng.integers(0, len(looks)))]
        styled = Image.fromarray(match_histograms(np.asarray(base), look))
        return np.asarray(self.colour(styled, 0.5)), np.asarray(self.colour(base, self.aug.tile_strength))


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each channel of `image` remapped so its histogram is the reference's (uint8 in, uint8 out).

    The cheapest style transfer there is: exposure, white balance, saturation and the season's
    colours move with the histograms, the shapes (fields, roads, shores) stay where they were.
    """
    out = np.empty_like(image)
    for c in range(3):
        src = image[..., c].ravel()
        values, inverse, counts = np.unique(src, return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(reference[..., c].ravel(), return_counts=True)
        quantiles = np.cumsum(counts) / src.size
        ref_quantiles = np.cumsum(ref_counts) / ref_counts.sum()
        mapped = np.interp(quantiles, ref_quantiles, ref_values.astype(np.float64))
        out[..., c] = np.clip(mapped[inverse] + 0.5, 0, 255).astype(np.uint8).reshape(image.shape[:2])
    return out


def photo_north_up(label: ResolvedLabel, heading_deg: float | None = None) -> Image.Image:
    """The label's photo turned north-up (by its heading, or `heading_deg` when it had none), shrunk."""
    image = load_photo(str(label.photo))
    heading = label.heading if label.heading is not None else heading_deg
    return Image.fromarray(north_up(image, float(heading or 0.0)))


def raster_tile(raster: str, cx: float, cy: float, side_m: float, size: int) -> tuple[Image.Image, float]:
    """The raster's north-up crop at a label or tile centre, read as the indexer reads tiles."""
    arr, valid = satellite_crop(raster, cx, cy, side_m, size)
    return Image.fromarray(arr), valid


def normalise(images: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def trunk_maps(split: TrunkHead, images: list[np.ndarray], batch: int = 32,
               cancel: Callable[[], bool] | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The frozen trunk's output for every view, stored in fp16 (half the memory, same training)."""
    bb = split.backbone
    out = []
    for i in range(0, len(images), batch):
        if cancel and cancel():
            raise Cancelled("Adaptation cancelled; the active model is unchanged.")
        out.append(split.trunk(normalise(images[i:i + batch], bb.mean, bb.std)).half())
        if progress:
            progress(min(i + batch, len(images)))
    return torch.cat(out) if out else torch.zeros(0)

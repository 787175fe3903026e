"""Image loading and the paired training augmentation, with PIL, numpy and torch only.

The augmentation follows the recipe of the method's predecessors (MEAN, Sample4Geo): the same
random horizontal flip on both views (a mirrored world is still a consistent pair; flipping one
view alone would teach the model that mirror images match), the satellite view turned by a random
multiple of 90° (a satellite tile has no "up" a drone photo shares), and camera-like damage —
colour jitter, blur or sharpening, coarse dropout, JPEG — so the model stops relying on the exact
tones and textures of one sensor.

Randomness comes from a numpy Generator passed in, or drawn from torch's RNG, which DataLoader
seeds per worker; numpy's global RNG would repeat the same augmentation in every worker.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, UnidentifiedImageError

from model_backend.core.errors import InputError

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the training augmentation; the defaults follow MEAN's recipe in spirit."""

    p_flip: float = 0.5
    rotate_satellite: bool = True
    brightness: float = 0.2
    """Each factor is drawn from 1 ± this."""
    contrast: float = 0.2
    saturation: float = 0.2
    hue_deg: float = 10.0
    p_blur: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    p_sharpen: float = 0.15
    p_dropout: float = 0.25
    dropout_holes: int = 4
    dropout_size: tuple[float, float] = (0.05, 0.15)
    """Side of each hole as a fraction of the image side."""
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 95)
    p_grey: float = 0.0
    """Chance that an image is shown as its luminance only: across years a field's colour changes while its
    shape stays, and a model shown grey views learns to lean on shape. 0 draws nothing (old runs replay)."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image as RGB with its EXIF orientation applied (phones and drones rotate by tag)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise InputError(f"Image not found: {path}.") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"Cannot read image {path} ({type(exc).__name__}); replace or remove it.") from None


def as_pil(img: ImageLike) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img)).convert("RGB")


def square_crop(img: Image.Image) -> Image.Image:
    """Centre square: drone photos are 4:3 or 16:9 while the model and the satellite tiles are square."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else img


def to_model_input(img: ImageLike, size: int) -> np.ndarray:
    """Centre square crop, resized (antialiased bicubic) to size x size: (size, size, 3) uint8."""
    pil = square_crop(as_pil(img))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(pil, dtype=np.uint8)


def to_tensor(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float normalised with the model's mean/std."""
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))


def _hue(img: Image.Image, deg: float) -> Image.Image:
    if abs(deg) < 0.5:
        return img
    h, s, v = img.convert("HSV").split()
    shift = int(round(deg / 360.0 * 255.0))
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def photometric(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """Exposure, contrast, saturation, white balance, focus, compression and grey, each drawn independently."""
    for enhance, amount in ((ImageEnhance.Brightness, cfg.brightness), (ImageEnhance.Contrast, cfg.contrast),
                            (ImageEnhance.Color, cfg.saturation)):
        if amount > 0:
            img = enhance(img).enhance(float(rng.uniform(1.0 - amount, 1.0 + amount)))
    if cfg.hue_deg > 0:
        img = _hue(img, float(rng.uniform(-cfg.hue_deg, cfg.hue_deg)))
    u = rng.random()
    if u < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(*cfg.blur_sigma))))
    elif u < cfg.p_blur + cfg.p_sharpen:
        img = ImageEnhance.Sharpness(img).enhance(float(rng.uniform(1.5, 3.0)))
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if cfg.p_grey > 0 and rng.random() < cfg.p_grey:
        img = img.convert("L").convert("RGB")
    return img


def coarse_dropout(arr: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Grey out a few rectangles (occlusion by trees, cars, clouds, or a missing part of the scene)."""
    if rng.random() >= cfg.p_dropout:
        return arr
    out = arr.copy()
    h, w = arr.shape[:2]
    for _ in range(int(rng.integers(1, cfg.dropout_holes + 1))):
        bh = max(1, int(h * rng.uniform(*cfg.dropout_size)))
        bw = max(1, int(w * rng.uniform(*cfg.dropout_size)))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[y:y + bh, x:x + bw] = (124, 116, 104)   # the ImageNet mean: zero after normalisation
    return out


class PairTransform:
    """(drone, satellite) images -> two normalised tensors at the model's input size.

    With `train=False` only the deterministic part runs (centre square, resize, normalise), which
    is exactly what evaluation does, so a model is trained and tested on the same geometry.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, train: bool = True,
                 config: AugmentConfig = AugmentConfig()) -> None:
        self.size, self.mean, self.std, self.train, self.cfg = size, tuple(mean), tuple(std), train, config

    def augment(self, drone: ImageLike, satellite: ImageLike,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The augmented pair as uint8 arrays (size, size, 3): what the tensors are made from."""
        d = as_pil(to_model_input(drone, self.size))
        s = as_pil(to_model_input(satellite, self.size))
        if self.train:
            g = _rng(rng)
            if g.random() < self.cfg.p_flip:
                d, s = ImageOps.mirror(d), ImageOps.mirror(s)
            if self.cfg.rotate_satellite:
                k = int(g.integers(0, 4))
                if k:
                    s = s.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[k - 1])
            d, s = photometric(d, g, self.cfg), photometric(s, g, self.cfg)
            return coarse_dropout(np.asarray(d), g, self.cfg), coarse_dropout(np.asarray(s), g, self.cfg)
        return np.asarray(d), np.asarray(s)

    def __call__(self, drone: ImageLike, satellite: ImageLike,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        d, s = self.augment(drone, satellite, rng)
        return to_tensor(d, self.mean, self.std), to_tensor(s, self.mean, self.std)

    def single(self, img: ImageLike, rng: np.random.Generator | None = None, *, rotate: bool = False) -> torch.Tensor:
        """One image alone (the unpaired views CDTS trains on): flip, photometric, dropout, and a
        random multiple of 90° when `rotate` (satellite images)."""
        arr = to_model_input(img, self.size)
        if self.train:
            g = _rng(rng)
            pil = as_pil(arr)
            if g.random() < self.cfg.p_flip:
                pil = ImageOps.mirror(pil)
            k = int(g.integers(0, 4)) if rotate else 0
            if k:
                pil = pil.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[k - 1])
            arr = coarse_dropout(np.asarray(photometric(pil, g, self.cfg)), g, self.cfg)
        return to_tensor(arr, self.mean, self.std)

"""A drone photo against an index: query embeddings over unknown headings, then one score per tile.

A drone photo's heading is rarely known and a CNN embedding is not rotation invariant, so the
photo is embedded at R evenly spaced rotations and each tile keeps its best; a peer plugin that
tried one orientation missed every view whose heading was near 100°. The photo is never
squashed: the central square of its short side is what a square tile is compared with, which
is also how the footprint (ground size of the short side) is defined.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .index import TileIndex
from .model import EmbeddingModel
from .reader import FILL_RGB


def rotation_crops(photo: np.ndarray, rotations: int, size: int) -> np.ndarray:
    """(R, size, size, 3) uint8: the photo's central square at R headings (0°, 360/R°, ...)."""
    img = Image.fromarray(photo)
    h, w = photo.shape[:2]
    side = min(h, w)
    # Shrink first: rotating a 20-megapixel photo eight times costs seconds and adds nothing.
    f = min(1.0, (size * 1.5) / side)
    if f < 1.0:
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
        side = min(img.size)
    fill = tuple(int(v) for v in FILL_RGB)
    out = np.empty((rotations, size, size, 3), np.uint8)
    for i in range(rotations):
        angle = 360.0 * i / rotations
        rot = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill) if angle else img
        cw, ch = rot.size
        left, top = (cw - side) // 2, (ch - side) // 2
        crop = rot.crop((left, top, left + side, top + side))
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    return out


def embed_photo(model: EmbeddingModel, photo: np.ndarray, rotations: int) -> np.ndarray:
    """(R, D) unit vectors of the photo at R headings."""
    crops = rotation_crops(photo, max(1, rotations), model.meta.input_size)
    return model.embed(model.normalise(crops))


def score_tiles(index: TileIndex, queries: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity of each tile over the query rotations, and which rotation won.

    Chunked so a 10^6-tile fp16 index is scored without materialising it in fp32.
    """
    q = np.ascontiguousarray(queries.T, dtype=np.float32)
    n = index.n_tiles
    best = np.empty(n, np.float32)
    which = np.empty(n, np.int16)
    for s in range(0, n, chunk):
        sims = np.asarray(index.embeddings[s:s + chunk], dtype=np.float32) @ q
        which[s:s + chunk] = sims.argmax(axis=1)
        best[s:s + chunk] = sims.max(axis=1)
    return best, which

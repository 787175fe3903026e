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

from model_backend.geo.reader import FILL_RGB
from model_backend.index.scoring import EXACT_TOP, max_scores
from model_backend.index.store import TileIndex
from model_backend.locate.priors import north_up
from model_backend.locate.scores import TileScores
from model_backend.nn.embedder import EmbeddingModel


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


def query_crops(photo: np.ndarray, yaw_deg: float | None, rotations: int, size: int) -> np.ndarray:
    """The query policy, in one place: a photo whose EXIF gives its heading is turned north-up and
    cropped once; any other at `rotations` headings (the best heading wins per tile). (R, S, S, 3) uint8."""
    if yaw_deg is not None:
        return rotation_crops(north_up(photo, yaw_deg), 1, size)
    return rotation_crops(photo, max(1, rotations), size)


def photo_queries(model: EmbeddingModel, photo: np.ndarray, yaw_deg: float | None, rotations: int) -> np.ndarray:
    """(R, D) unit vectors of the photo as `query_crops` turns it."""
    return model.embed(model.normalise(query_crops(photo, yaw_deg, rotations, model.meta.input_size)))


def embed_photo(model: EmbeddingModel, photo: np.ndarray, rotations: int) -> np.ndarray:
    """(R, D) unit vectors of the photo at R headings."""
    crops = rotation_crops(photo, max(1, rotations), model.meta.input_size)
    return model.embed(model.normalise(crops))


def score_tiles(index: TileIndex, queries: np.ndarray, ann_min_tiles: int | None = None) -> TileScores:
    """Every tile of the index scored against the photo's query embeddings (see `tile_similarity`)."""
    best, which = tile_similarity(index, queries, ann_min_tiles=ann_min_tiles)
    return TileScores(index.grid, index.cols, index.rows, best, which)


def tile_similarity(index: TileIndex, queries: np.ndarray, exact_top: int = EXACT_TOP,
                    ann_min_tiles: int | None = None, kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity of each tile over the query rotations, and which rotation won.

    Scored by the kernel this CPU runs fastest (`index.scoring`: fp16, fp32, or a bf16/int8 copy
    kept beside the index), with the best `exact_top` tiles re-scored exactly in fp32, so the
    ranking of candidates is exact whichever kernel ran. Indexes with a compressed index
    (model_backend.index.ann) and at least `ann_min_tiles` tiles (default: the one it was built
    with, 10^6) are scored on its shortlist only (NaN elsewhere).
    """
    from model_backend.index.ann import ann_for, ann_score_tiles

    ann = ann_for(index, ann_min_tiles)
    if ann is not None:
        return ann_score_tiles(index, queries, ann)
    return max_scores(index, queries, kernel=kernel, exact_top=exact_top)

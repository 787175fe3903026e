"""A drone photo against an index: query embeddings over unknown headings, then one score per tile.

A drone photo's heading is rarely known and a CNN embedding is not rotation invariant, so the
photo is embedded at R evenly spaced rotations and each tile keeps its best; a peer plugin that
tried one orientation missed every view whose heading was near 100°. The photo is never
squashed: the central square of its short side is what a square tile is compared with, which
is also how the footprint (ground size of the short side) is defined.
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import torch
from PIL import Image

from model_backend.geo.reader import FILL_RGB
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


def tile_similarity(index: TileIndex, queries: np.ndarray, chunk: int = 65536, exact_top: int = 4096,
                    ann_min_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity of each tile over the query rotations, and which rotation won.

    Chunked so a 10^6-tile fp16 index is scored without materialising it in fp32. The product
    runs on the fp16 rows themselves (torch/oneDNN, fp32 accumulation, fp16 output): converting
    chunks to fp32 in numpy was the real cost (10^5 tiles: 0.8 s against 0.1 s). fp16 output
    rounds a score by up to 2.4e-4 - invisible in a heatmap, but enough to swap near-ties - so the
    best `exact_top` tiles are re-scored in fp32 and the ranking of candidates stays exact.
    Indexes with a compressed index (model_backend.index.ann) and at least `ann_min_tiles` tiles
    (default: the one it was built with, 10^6) are scored on its shortlist only (NaN elsewhere).
    """
    from model_backend.index.ann import ann_for, ann_score_tiles

    ann = ann_for(index, ann_min_tiles)
    if ann is not None:
        return ann_score_tiles(index, queries, ann)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = index.n_tiles
    best = np.empty(n, np.float32)
    which = np.empty(n, np.int16)
    half = index.embeddings.dtype == np.float16 and _half_matmul_is_fast(q.shape[1])
    qt_half = torch.from_numpy(np.ascontiguousarray(q.T)).half()
    for s in range(0, n, chunk):
        rows = index.embeddings[s:s + chunk]
        if half:  # max/argmax in torch too: numpy has no vectorised fp16 reductions
            vals, arg = (_as_tensor(rows) @ qt_half).max(dim=1)
            best[s:s + chunk] = vals.float().numpy()
            which[s:s + chunk] = arg.numpy()
        else:
            sims = np.asarray(rows, dtype=np.float32) @ q.T
            which[s:s + chunk] = sims.argmax(axis=1)
            best[s:s + chunk] = sims.max(axis=1)
    if half and n:
        top = np.sort(np.argpartition(-best, exact_top - 1)[:exact_top]) if n > exact_top else np.arange(n)
        sims_t = _as_tensor(index.embeddings[top]).float() @ torch.from_numpy(np.ascontiguousarray(q.T))
        vals, arg = sims_t.max(dim=1)
        best[top] = vals.numpy()
        which[top] = arg.numpy()
    return best, which


def _as_tensor(rows: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # rows of a read-only memory map: torch warns, but we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(rows))


@functools.lru_cache(maxsize=4)
def _half_matmul_is_fast(dim: int) -> bool:
    """Whether torch's fp16 product beats numpy's fp32 conversion here (AVX-512 yes; some CPUs have no fast path).

    Timed once per process on 8192 rows (a few ms), best of three each.
    """
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8192, dim), dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((dim, 8), dtype=np.float32)
    qh = torch.from_numpy(q).half()
    rows_t = torch.from_numpy(rows)

    def best_of(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    fast = best_of(lambda: rows_t @ qh) < best_of(lambda: rows.astype(np.float32) @ q)
    return fast

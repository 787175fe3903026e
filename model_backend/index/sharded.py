"""Beyond one machine: torchrun + torch.distributed shard the tile grid, rank 0 merges.

Indexing a mosaic too large for one machine reuses an existing launcher and collective layer
(torchrun, gloo on CPU, NCCL on GPU) rather than a home-made one. The unit of work is the
index's own chunk of tile rows (`build.CHUNK_TILES`): chunk c belongs to rank c % world, so
every rank embeds its chunks exactly as a single process would (same rows, same batches), and
the merged index equals the single-process one up to fp16 rounding of float noise.

Chunks are saved as usual (a crashed rank resumes like a single process). Rank 0 then makes sure
it holds every chunk (`build.gather_parts`). The process group itself is `core.dist`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from model_backend.core.dist import Shard, barrier, broadcast, init_distributed
from model_backend.index.build import build_chunks, index_folder
from model_backend.index.store import TileIndex

if TYPE_CHECKING:
    from model_backend.core.config import ModelConfig, TilingConfig
    from model_backend.index.build import ProgressFn


def index_sharded(raster: str, tiling: TilingConfig, model: ModelConfig, *, cache_dir: str | Path | None = None,
                  progress: ProgressFn | None = None) -> TileIndex | None:
    """`build_index` across the torchrun job: every rank embeds its chunks, rank 0 merges.

    Returns the merged index on rank 0, and on other ranks too when the cache folder is shared
    (None otherwise). Rank 0 loads the model first so the ONNX export happens once, not per rank.
    """
    from model_backend.geo.raster import open_raster
    from model_backend.geo.tiling import make_grid
    from model_backend.nn.embedder import EmbeddingModel

    rank, world, dev = init_distributed(model.device, float(os.environ.get("CDIKT_DIST_TIMEOUT_S", 6 * 3600)))
    shard = Shard(rank, world)
    info = open_raster(raster)
    grid = make_grid(info, tiling)
    if not shard.is_main:
        barrier()
    net = EmbeddingModel.load(model.weights, str(dev), model.threads, model.runtime)
    if shard.is_main:
        barrier()
    folder = index_folder(info, tiling, net, cache_dir)
    finished = bool(broadcast((folder / "manifest.json").exists()))
    idx = None if finished else build_chunks(info, grid, tiling, model, net, folder, progress, None, shard)
    barrier()  # rank 0 has written the manifest
    if idx is None and (folder / "manifest.json").exists():
        idx = TileIndex.open(folder)
    return idx


def compare_indexes(a: TileIndex, b: TileIndex) -> dict[str, float | int | bool]:
    """How far two indexes of the same raster differ: same tiles in the same order, embedding deltas.

    `equal_within_fp16` allows one fp16 step (rows are unit vectors: |x| < 1, step <= 2^-11)
    per value, what float noise across thread counts or batch splits can flip after rounding.
    """
    import numpy as np

    same_tiles = a.n_tiles == b.n_tiles and bool(np.array_equal(a.cols, b.cols) and np.array_equal(a.rows, b.rows))
    if not same_tiles:
        return {"same_tiles": False, "n_tiles_a": a.n_tiles, "n_tiles_b": b.n_tiles, "equal_within_fp16": False}
    ea = np.asarray(a.embeddings, np.float32)
    eb = np.asarray(b.embeddings, np.float32)
    diff = float(np.abs(ea - eb).max()) if ea.size else 0.0
    cos = float(np.min(np.sum(ea * eb, axis=1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))))
    return {"same_tiles": True, "n_tiles": a.n_tiles, "bitwise_equal_rows": float(np.mean(np.all(ea == eb, axis=1))),
            "max_abs_diff": diff, "min_cosine": cos, "equal_within_fp16": diff <= 2.0 ** -11 + 1e-9}

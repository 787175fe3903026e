"""Beyond one machine: torchrun + torch.distributed shard the tile grid, rank 0 merges.

Indexing a mosaic too large for one machine reuses an existing launcher and collective layer
(torchrun, gloo on CPU, NCCL on GPU) rather than a home-made one. The unit of work is the
index's own chunk of tile rows (`indexing.CHUNK_TILES`): chunk c belongs to rank c % world, so
every rank embeds its chunks exactly as a single process would (same rows, same batches), and
the merged index equals the single-process one up to fp16 rounding of float noise.

Chunks are saved as usual (a crashed rank resumes like a single process). Rank 0 then makes sure
it holds every chunk: with a shared cache folder it finds them on disk; without one (separate
nodes, local disks) the missing ones are sent over the process group. torch.distributed is only
initialised when torchrun says so (WORLD_SIZE > 1), so a plain run never opens a socket.
Training (DDP) reuses `init_distributed` and `is_main`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import atomic_write_bytes
from .index import IndexWriter, TileIndex

if TYPE_CHECKING:
    from .config import ModelConfig, TilingConfig
    from .indexing import ProgressFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's share of a job: chunk c is ours when c % world == rank."""

    rank: int = 0
    world: int = 1

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, joining the process group when torchrun started us.

    Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the answer is
    (0, 1, device). Under torchrun each process takes GPU LOCAL_RANK with NCCL when CUDA is
    there (and not refused by device='cpu'), else the CPU with gloo. Calling it twice is harmless.
    """
    import torch.distributed as dist

    from .model import resolve_device

    world = env_world_size()
    if world <= 1:
        return 0, 1, resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    log.info("Rank %d of %d on %s (%s)", rank, dist.get_world_size(), dev, dist.get_backend())
    return rank, dist.get_world_size(), dev


def is_main() -> bool:
    """True on rank 0, and in any process not started by torchrun: where logs, prints and saves belong."""
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def current_shard() -> Shard:
    if not is_distributed():
        return Shard()
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: object, src: int = 0) -> object:
    """`value` as rank `src` has it, on every rank (identity when not distributed)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_parts(writer: IndexWriter, shard: Shard) -> None:
    """After every rank saved its chunks, make rank 0 hold all of them (collective: all ranks call it).

    Rank 0 lists what it cannot see on its disk; each owner sends those chunk files as bytes.
    On one machine or a shared cache folder nothing is sent.
    """
    if shard.world <= 1:
        return
    import torch.distributed as dist

    barrier()
    missing = [c for c in range(writer.n_chunks) if not writer._part(c).exists()] if shard.is_main else None
    missing = broadcast(missing)
    assert isinstance(missing, list)
    for chunk in missing:
        owner = chunk % shard.world
        if owner == 0:
            raise RuntimeError(f"Rank 0 lacks its own chunk {chunk}; rerun to resume")
        if shard.rank == owner:
            dist.send_object_list([writer._part(chunk).read_bytes()], dst=0)
        elif shard.is_main:
            box: list[object] = [None]
            dist.recv_object_list(box, src=owner)
            assert isinstance(box[0], bytes)
            atomic_write_bytes(writer._part(chunk), box[0])
    if missing and shard.is_main:
        log.info("Received %d chunks from other ranks", len(missing))
    barrier()


def index_sharded(raster: str, tiling: TilingConfig, model: ModelConfig, *, cache_dir: str | Path | None = None,
                  progress: ProgressFn | None = None) -> TileIndex | None:
    """`build_index` across the torchrun job: every rank embeds its chunks, rank 0 merges.

    Returns the merged index on rank 0, and on other ranks too when the cache folder is shared
    (None otherwise). Rank 0 loads the model first so the ONNX export happens once, not per rank.
    """
    from .indexing import _build, index_folder
    from .model import EmbeddingModel
    from .raster import open_raster
    from .tiling import make_grid

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
    idx = None if finished else _build(info, grid, tiling, model, net, folder, progress, None, shard)
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


def shutdown() -> None:
    """Leave the process group (torchrun expects every rank to exit cleanly)."""
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()

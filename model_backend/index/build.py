"""Build (or reuse, or resume) the tile index of a raster.

Reading overlaps compute: a reader thread decodes strips and assembles batches while the model
embeds the previous one (GDAL releases the GIL while decoding), so end-to-end throughput stays
close to the model's own. With a CPU runtime (OpenVINO, ONNX Runtime) the batches stay uint8
and the runtime's graph normalises them (`runtime.uint8_runner`): on two cores every cycle the
reader thread spends is one the model loses, and normalising was half of the reader's work.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.errors import RasterioError, RasterioIOError

from model_backend.core.atomic import atomic_write_bytes
from model_backend.core.config import ModelConfig, TilingConfig
from model_backend.core.dist import Shard, barrier, broadcast
from model_backend.core.errors import Cancelled, InputError
from model_backend.core.locks import file_lock
from model_backend.core.paths import default_cache_dir
from model_backend.core.requests import IndexRequest
from model_backend.core.space import disk_full, no_space_error
from model_backend.geo.raster import RasterInfo, open_raster
from model_backend.geo.reader import StripReader, compute_stretch
from model_backend.geo.tiling import TileGrid, make_grid
from model_backend.index.store import (
    CHECKED_FILES,
    INDEX_FORMAT,
    LOCK_FILE,
    CorruptIndex,
    IndexWriter,
    TileIndex,
    index_key,
)
from model_backend.nn.embedder import EmbeddingModel

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
Batch = tuple[np.ndarray, np.ndarray, torch.Tensor | np.ndarray]
"""(cols, rows, images): images normalised (a tensor for `EmbeddingModel.embed`), or (B, 3, S, S) uint8."""
Embed = Callable[[np.ndarray], np.ndarray]

PROGRESS_EVERY_S = 0.5
"""How often a long build reports within a chunk: the plugin promises a visible change every 2 s."""


class Ticker:
    """True at most once per `period` seconds: throttles progress reports to what a person can read."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.period:
            self._last = now
            return True
        return False


_DONE = object()
CHUNK_TILES = 1024
"""Tiles per saved chunk: the most work a crash or cancel can lose, and the unit ranks share (distributed)."""


def chunk_tiles() -> int:
    """CHUNK_TILES, or $CDIKT_CHUNK_TILES: smaller chunks spread a small raster over more ranks (and tests)."""
    env = os.environ.get("CDIKT_CHUNK_TILES", "")
    return int(env) if env.isdigit() and int(env) > 0 else CHUNK_TILES


def uint8_embedder(net: EmbeddingModel) -> Embed | None:
    """(B, 3, S, S) uint8 -> embeddings through `net`'s CPU runtime with normalisation in its graph, or None.

    None (the reader normalises and `net.embed` runs, as before) for PyTorch, CUDA, a runtime that
    cannot take uint8, and a model whose `embed` was overridden or wrapped: whoever replaces
    `embed` (a counting test double, a timing harness) still sees every batch.
    """
    from model_backend.nn.runtime import uint8_runner

    if net.runner is None or "embed" in vars(net) or type(net).embed is not EmbeddingModel.embed:
        return None
    return uint8_runner(net.runner, net.meta.mean, net.meta.std, net.meta.input_size)


def tile_batches(reader: StripReader, model: EmbeddingModel, r0: int, r1: int, batch_size: int,
                 min_valid: float, raw: bool = False) -> Iterator[Batch]:
    """Kept tiles of rows [r0, r1) in batches; tiles mostly nodata are dropped here.

    Kept tiles are gathered straight from the reader's strip views into one (B, 3, S, S) uint8
    array per batch (the only copy of their pixels). `raw`: yield it as is (for `uint8_embedder`);
    else `model.normalise` it.
    """
    s = reader.tile_px
    buf = np.empty((batch_size, 3, s, s), np.uint8)
    pend_c: list[np.ndarray] = []
    pend_r: list[np.ndarray] = []
    n = 0

    def emit(count: int) -> Batch:
        cols, rows = np.concatenate(pend_c), np.concatenate(pend_r)
        images = buf[:count]
        return cols, rows, images if raw else model.normalise(images.transpose(0, 2, 3, 1))

    for r, c0, tiles, valid in reader.iter_rows(r0, r1, channels_first=True):
        keep = np.nonzero(valid >= min_valid)[0]
        while keep.size:
            take = keep[:batch_size - n]
            np.take(tiles, take, axis=0, out=buf[n:n + take.size], mode="clip")  # "raise" would buffer
            pend_c.append((take + c0).astype(np.int32))
            pend_r.append(np.full(take.size, r, np.int32))
            n += take.size
            keep = keep[take.size:]
            if n == batch_size:
                yield emit(n)
                buf = np.empty_like(buf)  # the consumer may still hold the last one (prefetch queue)
                pend_c, pend_r, n = [], [], 0
    if n:
        yield emit(n)


def _prefetch(gen: Iterator[Batch], depth: int = 3) -> Iterator[Batch]:
    """Run a generator in a thread, `depth` items ahead; errors are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in gen:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)

    t = threading.Thread(target=work, name="cdikt-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def index_folder(info: RasterInfo, tiling: TilingConfig, model: EmbeddingModel,
                 cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "indexes" / index_key(info, tiling, model.meta)


def build_index(raster: str, tiling: TilingConfig = TilingConfig(), model: ModelConfig = ModelConfig(), *,
                cache_dir: str | Path | None = None, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None, embedder: EmbeddingModel | None = None) -> TileIndex:
    """Return the finished index for (raster, tiling, model), building only what is missing."""
    info = open_raster(raster)
    grid = make_grid(info, tiling)
    net = embedder or EmbeddingModel.load(model.weights, model.device, model.threads, model.runtime)
    folder = index_folder(info, tiling, net, cache_dir)
    idx = _finished(folder, progress)
    if idx is not None:
        return idx

    def waiting() -> None:
        log.info("Another process is building the index in %s; waiting for it", folder)
        if progress:
            progress(0.0, "Waiting for another process indexing this raster…")

    # One builder per index: a second process (another QGIS, a script) waits, then reuses its work.
    with file_lock(folder / LOCK_FILE, on_wait=waiting, cancel=cancel,
                   what="this raster's index"):
        idx = _finished(folder, progress)
        if idx is None:
            idx = build_chunks(info, grid, tiling, model, net, folder, progress, cancel)
    if idx is None:  # only ranks other than 0 of a sharded build (distributed.index_sharded) return None
        raise RuntimeError("unsharded build returned no index")
    return idx


def _finished(folder: Path, progress: ProgressFn | None) -> TileIndex | None:
    """The finished index in `folder`, or None; a damaged one is set aside (with a warning) to be rebuilt."""
    if not (folder / "manifest.json").exists():
        return None
    try:
        idx = TileIndex.open(folder)
    except CorruptIndex as exc:
        log.warning("The index in %s is damaged (%s); rebuilding it", folder, exc)
        for name in ("manifest.json", *CHECKED_FILES, "ann.faiss", "ann.json"):
            (folder / name).unlink(missing_ok=True)
        return None
    if progress:
        progress(1.0, f"Reusing index of {idx.n_tiles} tiles")
    return idx


def build_chunks(info: RasterInfo, grid: TileGrid, tiling: TilingConfig, model: ModelConfig, net: EmbeddingModel,
           folder: Path, progress: ProgressFn | None, cancel: CancelFn | None,
           shard: Shard | None = None) -> TileIndex | None:
    """Embed the missing chunks this process owns (all of them unless `shard` says otherwise), then merge."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the index folder {folder} ({exc.strerror}); set another cache folder.") \
            from None
    writer = IndexWriter(folder, grid, chunk_rows=max(1, math.ceil(chunk_tiles() / grid.n_cols)))
    done = writer.done_chunks()
    with _readable(info):
        stretch = compute_stretch(info)
    t0 = time.perf_counter()
    shard = shard or Shard()
    mine = [c for c in range(writer.n_chunks) if shard.owns(c)]
    tiles_total = sum(writer.chunk_rows_range(c)[1] - writer.chunk_rows_range(c)[0] for c in mine) * grid.n_cols
    tiles_done = sum(writer.chunk_rows_range(c)[1] - writer.chunk_rows_range(c)[0]
                     for c in mine if c in done) * grid.n_cols
    if done:
        log.info("Resuming index %s: %d of %d chunks already embedded", folder.name, len(done), writer.n_chunks)
    raw_embed = uint8_embedder(net)
    ticker = Ticker(PROGRESS_EVERY_S)
    with _readable(info), StripReader(info, grid, net.meta.input_size, stretch) as reader:
        for chunk in mine:
            if chunk in done:
                continue
            r0, r1 = writer.chunk_rows_range(chunk)
            cols, rows, embs = [], [], []
            in_chunk = 0
            for c, r, batch in _prefetch(tile_batches(reader, net, r0, r1, model.batch_size,
                                                  tiling.min_valid_fraction, raw=raw_embed is not None)):
                if cancel and cancel():
                    raise Cancelled()
                out = raw_embed(batch) if raw_embed is not None else net.embed(batch)  # type: ignore[arg-type]
                if not np.isfinite(out).all():  # never cached: a poisoned index would outlive the repair
                    raise InputError(f"The model {net.meta.weights_name or 'in use'} gives invalid (NaN) embeddings "
                                     f"on runtime {net.runtime}; its weights file may be damaged. Use another "
                                     "copy, or --runtime torch.")
                embs.append(out.astype(np.float16))
                cols.append(c)
                rows.append(r)
                # Between chunks (which can take tens of seconds on a CPU) the user still sees it move;
                # tiles skipped as nodata are only counted when their chunk ends.
                in_chunk += len(c)
                if progress and ticker.due():
                    n = min(tiles_done + in_chunk, tiles_total)
                    progress(n / max(1, tiles_total), f"Embedding tiles {n:,} of {tiles_total:,}")
            if cancel and cancel():
                raise Cancelled()
            dim = net.meta.dim
            with _space_for(folder, (r1 - r0) * grid.n_cols * dim * 2):
                writer.save_chunk(chunk,
                                  np.concatenate(cols) if cols else np.zeros(0, np.int32),
                                  np.concatenate(rows) if rows else np.zeros(0, np.int32),
                                  np.concatenate(embs) if embs else np.zeros((0, dim), np.float16))
            tiles_done += (r1 - r0) * grid.n_cols
            if progress:
                progress(tiles_done / max(1, tiles_total), f"Embedding tiles {tiles_done:,} of {tiles_total:,}")
    if shard.world > 1:
        gather_parts(writer, shard)  # collective: rank 0 ends up with every chunk
        if not shard.is_main:
            return None
    manifest = {
        "format": INDEX_FORMAT,
        "raster": {"path": info.path, "fingerprint": info.fingerprint, "crs_wkt": info.crs_wkt,
                   "transform": list(info.transform), "width": info.width, "height": info.height,
                   "count": info.count, "dtype": info.dtype, "gsd_m": [info.gsd_x_m, info.gsd_y_m]},
        "tiling": tiling.to_dict(),
        "grid": grid.to_dict(),
        "model": {**net.meta.to_dict(), "config": model.to_dict()},
        "stretch": stretch.to_dict(),
        "device": str(net.device),
        "runtime": net.runtime,
        "world_size": shard.world,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with _space_for(folder, grid.n_tiles * net.meta.dim * 2):
        return writer.finish(manifest, net.meta.dim)


@contextmanager
def _readable(info: RasterInfo) -> Iterator[None]:
    """A raster that opens but cannot be read through (truncated GeoTIFF, a VRT whose source is gone):
    one line naming it; the chunks embedded so far are kept."""
    try:
        yield
    except (RasterioError, RasterioIOError) as exc:
        raise InputError(f"Cannot read {Path(info.path).name} ({str(exc).strip().splitlines()[0][:160]}); "
                         "the file may be truncated or a VRT's source missing. Check or re-export the raster.") \
            from None


@contextmanager
def _space_for(folder: Path, need_bytes: int) -> Iterator[None]:
    """A full disk while writing the index: one line naming the cache folder; finished chunks are kept."""
    try:
        yield
    except OSError as exc:
        if disk_full(exc, folder):
            raise no_space_error(folder, need_bytes, "the index",
                                 "Free some space or set another cache folder; finished chunks are kept.") from None
        raise


def gather_parts(writer: IndexWriter, shard: Shard) -> None:
    """After every rank saved its chunks, make rank 0 hold all of them (collective: all ranks call it).

    Rank 0 lists what it cannot see on its disk; each owner sends those chunk files as bytes.
    On one machine or a shared cache folder nothing is sent.
    """
    if shard.world <= 1:
        return
    import torch.distributed as dist

    barrier()
    missing = [c for c in range(writer.n_chunks) if not writer.part_path(c).exists()] if shard.is_main else None
    missing = broadcast(missing)
    assert isinstance(missing, list)
    for chunk in missing:
        owner = chunk % shard.world
        if owner == 0:
            raise RuntimeError(f"Rank 0 lacks its own chunk {chunk}; rerun to resume")
        if shard.rank == owner:
            dist.send_object_list([writer.part_path(chunk).read_bytes()], dst=0)
        elif shard.is_main:
            box: list[object] = [None]
            dist.recv_object_list(box, src=owner)
            assert isinstance(box[0], bytes)
            atomic_write_bytes(writer.part_path(chunk), box[0])
    if missing and shard.is_main:
        log.info("Received %d chunks from other ranks", len(missing))
    barrier()


@dataclass(frozen=True)
class IndexedRaster:
    """What `index_raster` gives back: the index, and the compressed index's path when there is one."""

    index: TileIndex
    ann_path: str | None


def index_raster(request: IndexRequest, *, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> IndexedRaster:
    """The job as every front end asks for it: one IndexRequest, unchanged (see core.requests)."""
    from model_backend.index.ann import ensure_ann

    idx = build_index(request.raster, request.tiling, request.model, cache_dir=request.cache_dir,
                      progress=progress, cancel=cancel)
    return IndexedRaster(idx, ensure_ann(idx, request.ann))

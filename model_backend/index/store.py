"""The tile index on disk: fp16 embeddings + tile positions + a manifest, reused across queries.

Encode once, query many (the lesson of Geo-SAM, and the opposite of a peer that re-embeds
every tile for every query). An index lives in its own folder under the user cache, named by
a key over everything that changes its content: the raster's fingerprint, the tiling config,
the model weights and the reader's version. Work is saved in row chunks as it goes, so a
cancelled or crashed run resumes; the manifest is written last and atomically, so a folder
without one is never mistaken for a finished index.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.core.atomic import atomic_save_npy, atomic_write, atomic_write_bytes
from model_backend.core.config import TilingConfig
from model_backend.core.errors import InputError
from model_backend.geo.raster import RasterInfo
from model_backend.geo.tiling import TileGrid
from model_backend.nn.weights import ModelMeta

INDEX_FORMAT = 1
READER_VERSION = 2  # bump when tile pixels change for the same raster/tiling/model


def index_key(info: RasterInfo, tiling: TilingConfig, meta: ModelMeta) -> str:
    payload = json.dumps({
        "raster": info.fingerprint, "tiling": {k: v for k, v in tiling.to_dict().items() if k != "max_tiles"},
        "model": meta.weights_sha256, "pooling": meta.pooling, "input": meta.input_size,
        "reader": READER_VERSION, "format": INDEX_FORMAT,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class TileIndex:
    """A finished index: what the query needs, memory-mapped so opening it is instant."""

    folder: Path
    manifest: dict[str, Any]
    embeddings: np.ndarray
    """(N, D) float16, L2-normalised rows."""
    cols: np.ndarray
    rows: np.ndarray
    grid: TileGrid

    @property
    def n_tiles(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def open(cls, folder: Path) -> TileIndex:
        manifest = json.loads((folder / "manifest.json").read_text())
        emb = np.load(folder / "embeddings.npy", mmap_mode="r")
        pos = np.load(folder / "tiles.npy")
        g = manifest["grid"]
        grid = TileGrid(**{**g, "transform": tuple(g["transform"])})
        return cls(folder, manifest, emb, pos[:, 0], pos[:, 1], grid)


class IndexWriter:
    """Collects embeddings chunk by chunk and turns them into a TileIndex at the end."""

    def __init__(self, folder: Path, grid: TileGrid, chunk_rows: int) -> None:
        self.folder = folder
        self.parts = folder / "parts"
        self.grid = grid
        self.chunk_rows = chunk_rows

    @property
    def n_chunks(self) -> int:
        return -(-self.grid.n_rows // self.chunk_rows)

    def chunk_rows_range(self, chunk: int) -> tuple[int, int]:
        r0 = chunk * self.chunk_rows
        return r0, min(r0 + self.chunk_rows, self.grid.n_rows)

    def part_path(self, chunk: int) -> Path:
        return self.parts / f"chunk_{chunk:06d}.npz"

    def done_chunks(self) -> set[int]:
        if not self.parts.exists():
            return set()
        return {int(p.stem.split("_")[1]) for p in self.parts.glob("chunk_*.npz")}

    def save_chunk(self, chunk: int, cols: np.ndarray, rows: np.ndarray, emb: np.ndarray) -> None:
        atomic_write(self.part_path(chunk), lambda f: np.savez(f, cols=cols.astype(np.int32),
                                                            rows=rows.astype(np.int32), emb=emb.astype(np.float16)),
                     suffix=".npz")

    def finish(self, manifest: dict[str, Any], dim: int) -> TileIndex:
        cols, rows, embs = [], [], []
        for chunk in range(self.n_chunks):
            with np.load(self.part_path(chunk)) as z:
                cols.append(z["cols"])
                rows.append(z["rows"])
                embs.append(z["emb"])
        emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)
        pos = np.stack([np.concatenate(cols), np.concatenate(rows)], axis=1).astype(np.int32)
        if len(pos) == 0:
            raise InputError("Every tile of this raster is nodata or masked; check its nodata/alpha settings.")
        atomic_save_npy(self.folder / "embeddings.npy", emb)
        atomic_save_npy(self.folder / "tiles.npy", pos)
        manifest = {**manifest, "n_tiles": int(len(pos)), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(self.folder / "manifest.json", json.dumps(manifest, indent=1).encode())
        shutil.rmtree(self.parts, ignore_errors=True)
        return TileIndex.open(self.folder)

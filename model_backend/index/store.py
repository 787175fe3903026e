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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.core.atomic import atomic_save_npy, atomic_write, atomic_write_bytes
from model_backend.core.checksums import sha256_file
from model_backend.core.config import TilingConfig
from model_backend.core.errors import CdiktError, InputError
from model_backend.geo.raster import RasterInfo
from model_backend.geo.tiling import TileGrid
from model_backend.nn.weights import ModelMeta

INDEX_FORMAT = 1
READER_VERSION = 3  # bump when tile pixels change for the same raster/tiling/model
CHECKED_FILES = ("embeddings.npy", "tiles.npy")
LOCK_FILE = ".lock"
"""Held by the process building an index (index.build), so a second one waits and `cache --prune` skips it."""
MAX_NORM_ERROR = 0.05
"""Rows are stored L2-normalised in fp16 (norm within ~1e-3 of 1); farther off, the file is damaged."""


class CorruptIndex(CdiktError):
    """A finished index whose files cannot be trusted; `build_index` rebuilds it."""


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of each of the index's data files, recorded in its manifest."""
    return {name: sha256_file(folder / name) for name in CHECKED_FILES}


_VERIFIED: set[tuple] = set()
"""Index file versions (folder, checksums, sizes, modification times) already checked in this process."""


def verify_files(folder: Path, checksums: dict[str, str] | None) -> None:
    """Check the data files against the manifest's checksums and the embeddings' norms; once per
    process and file version (keyed by size and modification time), as a flight reopens one index
    for every photo."""
    key = _version_key(folder, checksums)
    if key not in _VERIFIED:
        _verify(folder, checksums or {})
        _VERIFIED.add(key)


def _version_key(folder: Path, checksums: dict[str, str] | None) -> tuple:
    stats = tuple((name, st.st_size, st.st_mtime_ns) for name in CHECKED_FILES for st in [(folder / name).stat()])
    return str(folder), stats, json.dumps(checksums or {}, sort_keys=True)


def _verify(folder: Path, checksums: dict[str, str]) -> None:
    for name, want in checksums.items():
        if name in CHECKED_FILES and sha256_file(folder / name) != want:
            raise CorruptIndex(f"{name} does not match its checksum")
    check_rows(np.load(folder / "embeddings.npy", mmap_mode="r"))


def check_rows(emb: np.ndarray) -> None:
    """Raise CorruptIndex unless every row is a finite unit vector (read in blocks: it may be a memory map)."""
    for s in range(0, emb.shape[0], 65536):
        block = np.asarray(emb[s:s + 65536], dtype=np.float32)
        if not np.isfinite(block).all():
            raise CorruptIndex("embeddings hold NaN or infinite values")
        if block.size and np.abs(np.linalg.norm(block, axis=1) - 1.0).max() > MAX_NORM_ERROR:
            raise CorruptIndex("embeddings are not unit vectors")


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
        """The finished index in `folder`, checked: raises CorruptIndex when it cannot be trusted.

        Shapes, tile positions and the manifest are checked on every open (cheap); the files'
        checksums and the embeddings' values once per process and file version (`verify_files`),
        so a flipped byte or a NaN row is caught before it becomes a heatmap of cosines of -258.
        """
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            emb = np.load(folder / "embeddings.npy", mmap_mode="r")
            pos = np.load(folder / "tiles.npy")
            g = manifest["grid"]
            grid = TileGrid(**{**g, "transform": tuple(g["transform"])})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptIndex(f"unreadable ({type(exc).__name__}: {exc})") from None
        n = manifest.get("n_tiles")
        if emb.ndim != 2 or emb.dtype != np.float16 or pos.ndim != 2 or pos.shape[1] != 2:
            raise CorruptIndex(f"unexpected array shapes {emb.shape} {emb.dtype} / {pos.shape}")
        if emb.shape[0] != pos.shape[0] or (n is not None and n != emb.shape[0]):
            raise CorruptIndex(f"{emb.shape[0]} embeddings for {pos.shape[0]} tiles (manifest: {n})")
        dim = manifest.get("model", {}).get("dim")
        if dim is not None and emb.shape[1] != dim:
            raise CorruptIndex(f"embeddings of {emb.shape[1]} dimensions, the model gives {dim}")
        if pos.size and (pos.min() < 0 or pos[:, 0].max() >= grid.n_cols or pos[:, 1].max() >= grid.n_rows):
            raise CorruptIndex(f"a tile lies off the {grid.n_cols} x {grid.n_rows} grid")
        verify_files(folder, manifest.get("checksums"))
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
        """Chunks already embedded and readable; a damaged one is deleted, to be embedded again."""
        if not self.parts.exists():
            return set()
        done = set()
        for p in self.parts.glob("chunk_*.npz"):
            try:
                chunk = int(p.stem.split("_")[1])
                with np.load(p) as z:
                    ok = z["cols"].shape == z["rows"].shape == z["emb"].shape[:1] and chunk < self.n_chunks
            except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile):
                ok = False
            if ok:
                done.add(chunk)
            else:
                p.unlink(missing_ok=True)
        return done

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
        check_rows(emb)  # build_chunks refuses NaN; a chunk damaged on disk is caught here
        atomic_save_npy(self.folder / "embeddings.npy", emb)
        atomic_save_npy(self.folder / "tiles.npy", pos)
        checksums = file_checksums(self.folder)
        manifest = {**manifest, "n_tiles": int(len(pos)), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "checksums": checksums}
        atomic_write_bytes(self.folder / "manifest.json", json.dumps(manifest, indent=1).encode())
        # Just hashed, and its rows checked above: opening it must not read it all again.
        _VERIFIED.add(_version_key(self.folder, checksums))
        shutil.rmtree(self.parts, ignore_errors=True)
        return TileIndex.open(self.folder)

"""Every tile's best score over a photo's headings, at the speed of reading the tile matrix.

Scoring 10^5 tiles x 8 headings is 2 GFLOP over a 256 MB fp16 matrix: reading it takes ~10-25 ms
on two cores, yet torch's fp16 product took 0.33 s and numpy's fp32 conversion 0.27 s, both
dominated by converting fp16 on the fly. A flight of 500 photos pays that per photo. So the
matrix is scored by one of four kernels, whichever this CPU runs fastest, measured once per
machine (`core.machine`):

- `fp16`: torch's product on the stored fp16 rows (no copy);
- `fp32`: fp16 rows converted in cache-sized blocks, then an sgemm (no copy);
- `bf16`: a bf16 copy of the matrix, kept beside the index (AVX512-BF16/AMX run it natively);
- `int8`: an int8 copy with a scale per row (VNNI dot products), half the bytes to read.

The copies are made once per index (10^5 tiles: ~0.2 s), written atomically, named after the
embeddings' checksum so a rebuilt index never meets a stale one, and spot-checked against the
fp16 rows when first opened in a process. Any kernel's scores are within ~2e-3 of fp32's (the
heatmap cannot show it); the best `exact_top` tiles are re-scored from the fp16 rows in fp32, so
candidates, their order and their scores are exactly today's whatever the kernel.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model_backend.core.atomic import atomic_path
from model_backend.core.machine import remembered

log = logging.getLogger(__name__)

KERNELS = ("fp16", "fp32", "bf16", "int8")
COPY_KERNELS = ("bf16", "int8")
"""Kernels that score a copy of the matrix kept beside the index."""
MIN_TILES_FOR_COPY = 20_000
"""Below this, scoring takes milliseconds whatever the kernel: no copy is written, only the copy-free kernels run."""
BLOCK_ROWS = 8192
"""Rows scored per product (20 MB of fp16): a 10^6-tile index never needs a full-size temporary."""
FP16_BLOCK_ROWS = 65536
"""torch's fp16 product runs best on long blocks (10^5 tiles: 0.33 s at 65536 rows, 0.5 s at 8192)."""
FP32_BLOCK_ROWS = 1024
"""Rows converted to fp32 at a time: 5 MB, inside a core's share of L2/L3, so the product reads them from cache."""
EXACT_TOP = 1024
"""Tiles re-scored exactly: 10x what candidate selection and a flight's 100 places ever read."""
ROUNDING = {"fp16": 2.5e-4, "fp32": 0.0, "bf16": 1e-3, "int8": 4e-3}
"""Largest |kernel - fp32| score, with margin: fp16 output rounds by 2.4e-4; on real embeddings bf16
was off by at most 4.5e-4 and int8 by 1.6e-3 (10^5 tiles x 8 headings)."""
MAX_SHORTLIST = 8
CHECK_ROWS = 256
MAX_COPY_ERROR = {"bf16": 1e-2, "int8": 2e-2}
"""Largest |copy - fp16| score on random rows before a copy is called damaged (bf16 rounds to 2^-9, int8 to 1/254)."""
MEASURE_ROWS = 16384


class Scorable(Protocol):
    """What scoring reads from a TileIndex (the bench passes a bare matrix in a folder)."""

    folder: Path | None
    embeddings: np.ndarray
    manifest: dict


@dataclass(frozen=True)
class Matrix:
    """The tile matrix as one kernel reads it: `rows` (N, D) and, for int8, a float32 scale per row."""

    kernel: str
    rows: np.ndarray
    scale: np.ndarray | None = None


def max_scores(index: Scorable, queries: np.ndarray, kernel: str | None = None,
               exact_top: int = EXACT_TOP) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine over the queries, which query gave it) for every tile: float32 (N,), int16 (N,).

    `kernel` None: the fastest measured on this machine (copy kernels only for indexes of at
    least MIN_TILES_FOR_COPY tiles). Then the shortlist is re-scored exactly in fp32 from the
    fp16 rows: every tile whose score is within twice the kernel's rounding (ROUNDING) of the
    `exact_top`-th best. A tile of the true best `exact_top` is off by at most that rounding, so
    it is always in the shortlist: those scores, their order and headings are exact.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    emb = index.embeddings
    n = int(emb.shape[0])
    kernel = kernel or choose_kernel(q.shape[1], n)
    matrix = open_matrix(index, kernel)
    best, which = _score(matrix, q)
    if matrix.kernel != "fp32" and n:
        top = _shortlist(best, exact_top, 2.0 * ROUNDING[matrix.kernel])
        sims = _tensor(np.asarray(emb[top])).float() @ torch.from_numpy(np.ascontiguousarray(q.T))
        vals, arg = sims.max(dim=1)
        best[top] = vals.numpy()
        which[top] = arg.numpy()
    return best, which


def _shortlist(best: np.ndarray, m: int, band: float) -> np.ndarray:
    """Sorted positions of every score >= (the m-th best - band); at most MAX_SHORTLIST x m (the best of
    them), which only a flat score field (thousands of near-ties far down the ranking) ever reaches."""
    n = best.size
    if n <= m:
        return np.arange(n)
    kth = np.partition(best, n - m)[n - m]
    top = np.flatnonzero(best >= kth - band)
    if top.size > MAX_SHORTLIST * m:
        top = np.sort(np.argpartition(-best, MAX_SHORTLIST * m - 1)[:MAX_SHORTLIST * m])
    return top


def choose_kernel(dim: int, n_tiles: int) -> str:
    """The fastest kernel measured on this machine for `dim`-d rows; a copy-free one for small indexes."""
    measured = measured_kernels(dim)
    ms = {k: v for k, v in measured["ms"].items() if v is not None}
    if n_tiles < MIN_TILES_FOR_COPY:
        ms = {k: v for k, v in ms.items() if k not in COPY_KERNELS}
    return min(ms, key=ms.__getitem__) if ms else "fp16"


def measured_kernels(dim: int) -> dict:
    """{"kernel": fastest, "ms": {kernel: ms per MEASURE_ROWS rows x 8 queries, None if it failed}}, measured once."""
    topic = f"scoring/{dim}d/torch{torch.__version__.split('+')[0]}/threads{torch.get_num_threads()}"
    return _remembered_kernels(topic, dim)


@functools.lru_cache(maxsize=8)
def _remembered_kernels(topic: str, dim: int) -> dict:
    def measure() -> dict:
        result = measure_kernels(dim)
        log.info("Scoring kernels measured on this CPU (ms per %d tiles): %s; using %s", MEASURE_ROWS,
                 result["ms"], result["kernel"])
        return result
    return remembered(topic, measure)


def measure_kernels(dim: int, rows: int = MEASURE_ROWS, queries: int = 8, reps: int = 5) -> dict:
    """Time every kernel on `rows` random unit rows (best of `reps`, interleaved): ~0.3 s in all."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb16 = emb.astype(np.float16)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    matrices: dict[str, Matrix] = {}
    for kernel in KERNELS:
        try:
            matrices[kernel] = _in_memory(emb16, kernel)
            _score(matrices[kernel], q)  # warm-up, and a kernel this torch lacks fails here
        except Exception as exc:  # e.g. no int8 product on this build: never chosen
            log.info("Scoring kernel %s unavailable here (%s: %s)", kernel, type(exc).__name__, exc)
    times: dict[str, list[float]] = {k: [] for k in matrices}
    for _ in range(reps):
        for kernel, m in matrices.items():
            t0 = time.perf_counter()
            _score(m, q)
            times[kernel].append(time.perf_counter() - t0)
    ms: dict[str, float | None] = {k: (round(1e3 * min(times[k]), 3) if k in times else None) for k in KERNELS}
    ok = {k: v for k, v in ms.items() if v is not None}
    return {"kernel": min(ok, key=ok.__getitem__), "ms": ms, "rows": rows, "queries": queries}


def open_matrix(index: Scorable, kernel: str) -> Matrix:
    """The index's matrix for `kernel`: the fp16 rows, or its copy (made on first use; fp32 if that fails)."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown scoring kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    emb = index.embeddings
    if kernel not in COPY_KERNELS:
        return Matrix(kernel, emb)
    if index.folder is None:
        return _in_memory(np.asarray(emb), kernel)
    try:
        return _copy(Path(index.folder), _source_tag(index), kernel, emb)
    except OSError as exc:  # a full or read-only cache: score the fp16 rows instead, slower but right
        log.warning("Could not keep a %s copy of the index in %s (%s); scoring the fp16 rows", kernel,
                    index.folder, exc)
        return Matrix("fp32", emb)


def copy_paths(folder: Path, tag: str, kernel: str) -> tuple[Path, Path]:
    """The copy's rows and (int8) its per-row scales."""
    return folder / f"scoring-{kernel}-{tag}.npy", folder / f"scoring-{kernel}-{tag}.scale.npy"


def _source_tag(index: Scorable) -> str:
    """Names the embeddings a copy was made from: their checksum, else their file's size and time."""
    sha = (index.manifest or {}).get("checksums", {}).get("embeddings.npy")
    if sha:
        return str(sha)[:16]
    st = (Path(index.folder) / "embeddings.npy").stat()  # type: ignore[arg-type]
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


_OPENED: dict[tuple[str, str, str], Matrix] = {}


def _copy(folder: Path, tag: str, kernel: str, emb: np.ndarray) -> Matrix:
    key = (str(folder), tag, kernel)
    if key in _OPENED:
        return _OPENED[key]
    rows_path, scale_path = copy_paths(folder, tag, kernel)
    matrix = _load_copy(rows_path, scale_path, kernel, emb)
    if matrix is None:
        for stale in folder.glob(f"scoring-{kernel}-*.npy"):  # another embeddings' copy, or a damaged one
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        _write_copy(rows_path, scale_path, kernel, emb)
        log.info("Made the index's %s scoring copy (%d tiles) in %.2f s", kernel, len(emb), time.perf_counter() - t0)
        matrix = _load_copy(rows_path, scale_path, kernel, emb)
        if matrix is None:
            raise OSError(f"the {kernel} copy just written does not match the index")
    _OPENED[key] = matrix
    return matrix


def _load_copy(rows_path: Path, scale_path: Path, kernel: str, emb: np.ndarray) -> Matrix | None:
    """The copy, memory-mapped, if it exists, fits the index and scores like it on sample rows."""
    try:
        rows = np.load(rows_path, mmap_mode="r")
        scale = np.load(scale_path, mmap_mode="r") if kernel == "int8" else None
    except (OSError, ValueError):
        return None
    want = np.int16 if kernel == "bf16" else np.int8
    if rows.shape != emb.shape or rows.dtype != want or (scale is not None and scale.shape != (len(emb),)):
        return None
    matrix = Matrix(kernel, rows, scale)
    n = len(emb)
    if n:
        sample = np.unique(np.random.default_rng(n).integers(0, n, min(CHECK_ROWS, n)))
        probe = np.asarray(emb[sample], np.float32)
        got = _score(Matrix(kernel, np.asarray(rows[sample]), None if scale is None else np.asarray(scale[sample])),
                     probe[:8])[0]
        want_scores = (probe @ probe[:8].T).max(axis=1)
        if not np.all(np.abs(got - want_scores) <= MAX_COPY_ERROR[kernel]):
            log.warning("The index's %s scoring copy is damaged; making it again", kernel)
            return None
    return matrix


def _write_copy(rows_path: Path, scale_path: Path, kernel: str, emb: np.ndarray) -> None:
    """Rows first, then (int8) the scales: a copy is complete only when both exist and fit."""
    n, d = emb.shape
    scale = np.empty(n, np.float32)
    with atomic_path(rows_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16 if kernel == "bf16" else np.int8,
                                        shape=(n, d))
        for s in range(0, n, BLOCK_ROWS):
            block = np.asarray(emb[s:s + BLOCK_ROWS])
            if kernel == "bf16":
                out[s:s + len(block)] = _bf16_bits(block)
            else:
                out[s:s + len(block)], scale[s:s + len(block)] = _int8_block(block)
        out.flush()
        del out
    if kernel == "int8":
        with atomic_path(scale_path) as tmp, open(tmp, "wb") as f:
            np.save(f, scale)


def _in_memory(emb16: np.ndarray, kernel: str) -> Matrix:
    if kernel == "bf16":
        return Matrix(kernel, _bf16_bits(emb16))
    if kernel == "int8":
        rows, scale = _int8_block(emb16)
        return Matrix(kernel, rows, scale)
    return Matrix(kernel, emb16)


def _bf16_bits(block: np.ndarray) -> np.ndarray:
    """fp16 rows as bf16 (round to nearest even), stored as their 16-bit patterns (int16) (numpy has no bf16)."""
    return _tensor(block).to(torch.bfloat16).view(torch.int16).numpy()


def _int8_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows quantised symmetrically, each by its own largest component: (int8 rows, float32 scale per row)."""
    f = _tensor(block).float()
    peak = f.abs().amax(dim=1) if len(f) else torch.zeros(0)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    rows = torch.round(f / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return rows.numpy(), scale.numpy().astype(np.float32, copy=False)


def _score(m: Matrix, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(m.rows)
    best = np.empty(n, np.float32)
    which = np.empty(n, np.int16)
    if m.kernel == "int8":
        q_peak = float(np.abs(q).max()) or 1.0
        q_scale = q_peak / 127.0
        qt = torch.from_numpy(np.ascontiguousarray(np.clip(np.rint(q.T / q_scale), -127, 127).astype(np.int8)))
        for s in range(0, n, BLOCK_ROWS):
            vals, arg = torch._int_mm(_tensor(m.rows[s:s + BLOCK_ROWS]), qt).max(dim=1)
            # max over headings before the row's scale: the scale is positive and the same for every heading
            best[s:s + BLOCK_ROWS] = vals.numpy() * (np.asarray(m.scale[s:s + BLOCK_ROWS]) * q_scale)  # type: ignore[index]
            which[s:s + BLOCK_ROWS] = arg.numpy()
        return best, which
    qt32 = torch.from_numpy(np.ascontiguousarray(q.T))
    if m.kernel == "bf16":
        qt, step = qt32.to(torch.bfloat16), BLOCK_ROWS
    elif m.kernel == "fp16":
        qt, step = qt32.half(), FP16_BLOCK_ROWS
    else:
        qt, step = qt32, FP32_BLOCK_ROWS
    for s in range(0, n, step):
        block = _tensor(m.rows[s:s + step])
        if m.kernel == "bf16":
            block = block.view(torch.bfloat16)
        elif m.kernel == "fp32":
            block = block.float()
        vals, arg = (block @ qt).max(dim=1)
        best[s:s + step] = vals.float().numpy()
        which[s:s + step] = arg.numpy()
    return best, which


def _tensor(rows: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # rows of a read-only memory map: torch warns, but they are only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(rows))

"""Compressed index for very large rasters (> 10^6 tiles): faiss IVF-PQ + exact re-ranking.

Exact scoring reads every fp16 vector for every query (10^6 tiles x 1280-d = 2.6 GB), fine up
to about 10^6 tiles. Beyond, an IVF-PQ index (inverted lists over k-means cells, each vector
compressed to `pq_m` bytes) finds a shortlist per query rotation by probing a few cells; the
shortlist is then re-scored exactly from the memory-mapped fp16 embeddings, so the reported
scores and the order of the best tiles are exact, and only the shortlist's rows are paged in.
Recall@10 against exact search is what is left to chance: measured >= 0.99 (see bench_scale).

The compressed index lives beside embeddings.npy (`ann.faiss` + `ann.json`) and is optional:
`score_tiles` uses it when it is present, matches the index, and the index has at least
`min_tiles` tiles. Tiles outside the shortlist get NaN scores (not scored), which the heatmap
writes as nodata and candidate selection ignores.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.core.atomic import atomic_path, atomic_write_bytes
from model_backend.core.errors import InputError
from model_backend.index.store import TileIndex

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
ANN_FORMAT = 1


@dataclass(frozen=True)
class AnnConfig:
    """How the compressed index is built and when queries use it."""

    nlist: int | None = None
    """Inverted lists (k-means cells); None: 2·sqrt(N), within [16, 65536]."""
    pq_m: int = 160
    """Bytes per compressed vector (sub-quantisers of 8 bits); must divide the dimension (1280 / 160 = 8)."""
    nprobe: int = 32
    """Cells visited per query vector."""
    shortlist: int = 2048
    """Candidates per query rotation re-scored exactly from the fp16 embeddings."""
    min_tiles: int = 1_000_000
    """Queries use the compressed index from this many tiles up (env CDIKT_ANN_MIN_TILES overrides)."""
    train_per_list: int = 40
    """Training vectors per list (faiss wants >= 39), capped at `max_train`."""
    max_train: int = 200_000
    pq_iters: int = 10
    """k-means iterations per sub-quantiser (faiss default 25: 2.5x the time, no recall to gain after re-ranking)."""
    build_threads: int = 1
    """faiss OpenMP threads while building: its small k-means loops spin-wait, and with 2 threads on a busy
    2-core machine training ran 10x slower than with 1 (measured)."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lists_for(self, n: int) -> int:
        return self.nlist or int(min(65536, max(16, round(2 * math.sqrt(n)))))


def _faiss():  # imported on use: only large indexes need it
    import faiss

    return faiss


def _fp32(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32)


def build_ann(index: TileIndex, config: AnnConfig = AnnConfig(), chunk: int = 65536) -> Path:
    """Train and fill an IVF-PQ index over `index.embeddings`; written atomically beside them.

    Training uses an evenly spread random sample (sorted, so the memory map is read forward);
    vectors are added chunk by chunk, so memory stays at the compressed size plus one chunk.
    """
    faiss = _faiss()
    n, dim = index.embeddings.shape
    if dim % config.pq_m:
        raise ValueError(f"pq_m={config.pq_m} must divide the embedding dimension {dim}")
    nlist = min(config.lists_for(n), max(1, n // 39))
    rng = np.random.default_rng(config.seed)
    n_train = min(n, config.max_train, max(nlist * config.train_per_list, 256 * 40))
    sample = np.sort(rng.choice(n, size=n_train, replace=False))
    # "np": no polysemous training, which faiss does by default for IVF-PQ and which took minutes here.
    ivf = faiss.index_factory(dim, f"IVF{nlist},PQ{config.pq_m}x8np", faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = config.seed  # reproducible k-means
    ivf.pq.cp.niter = config.pq_iters
    ivf.pq.cp.seed = config.seed
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, config.build_threads))
    try:
        ivf.train(_fp32(index.embeddings[sample]))
        for s in range(0, n, chunk):
            ivf.add(_fp32(index.embeddings[s:s + chunk]))
    finally:
        faiss.omp_set_num_threads(threads)
    folder = Path(index.folder)
    with atomic_path(folder / ANN_FILE) as tmp:
        faiss.write_index(ivf, tmp)
    meta = {"format": ANN_FORMAT, "n_tiles": int(n), "dim": int(dim), "nlist": int(nlist), "train": int(n_train),
            "config": config.to_dict(), "index_finished": index.manifest.get("finished")}
    atomic_write_bytes(folder / ANN_META, json.dumps(meta, indent=1).encode())
    log.info("Built IVF%d,PQ%d over %d tiles in %s", nlist, config.pq_m, n, folder)
    return folder / ANN_FILE


def ann_is_current(index: TileIndex) -> bool:
    """Whether `index` has a compressed index built for these very embeddings (a cheap check, no load)."""
    folder = Path(index.folder)
    if not (folder / ANN_FILE).is_file() or not (folder / ANN_META).is_file():
        return False
    try:
        meta = json.loads((folder / ANN_META).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("format") == ANN_FORMAT and meta.get("n_tiles") == index.n_tiles
            and meta.get("index_finished") == index.manifest.get("finished"))


@dataclass
class AnnIndex:
    """A loaded compressed index and the config it was built with."""

    ivf: Any
    meta: dict[str, Any]
    config: AnnConfig

    @classmethod
    def load(cls, index: TileIndex) -> AnnIndex | None:
        """The compressed index of `index`, or None when absent or stale (built for other embeddings)."""
        folder = Path(index.folder)
        if not (folder / ANN_FILE).is_file() or not (folder / ANN_META).is_file():
            return None
        if not ann_is_current(index):
            log.warning("Compressed index in %s does not match its embeddings; ignoring it", folder)
            return None
        try:
            meta = json.loads((folder / ANN_META).read_text())
            ivf = _faiss().read_index(str(folder / ANN_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("Compressed index in %s is unreadable (%s); using exact search", folder, exc)
            return None
        return cls(ivf, meta, AnnConfig(**meta.get("config", {})))

    @property
    def bytes_per_vector(self) -> float:
        """Codes + list ids in RAM per vector (centroids and codebooks are amortised; see bench)."""
        return float(self.ivf.code_size + 8)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (ids, scores) per query row; ids are -1 where fewer than k were found."""
        self.ivf.nprobe = int(nprobe or self.config.nprobe)
        scores, ids = self.ivf.search(_fp32(queries), int(k))
        return ids, scores


def min_tiles_for_ann(default: int) -> int:
    env = os.environ.get("CDIKT_ANN_MIN_TILES", "")
    return int(env) if env.isdigit() else default


_LOADED: dict[tuple[str, int, str | None], AnnIndex | None] = {}


def ann_for(index: TileIndex, min_tiles: int | None = None) -> AnnIndex | None:
    """The compressed index to use for `index`, or None for exact search (small index or none built)."""
    folder = getattr(index, "folder", None)
    if folder is None or not (Path(folder) / ANN_FILE).is_file():
        return None
    key = (str(folder), index.n_tiles, getattr(index, "manifest", {}).get("finished"))
    if key not in _LOADED:
        _LOADED[key] = AnnIndex.load(index)
    ann = _LOADED[key]
    if ann is None:
        return None
    threshold = min_tiles if min_tiles is not None else min_tiles_for_ann(ann.config.min_tiles)
    return ann if index.n_tiles >= threshold else None


def shortlist(ann: AnnIndex, queries: np.ndarray, k: int | None = None, nprobe: int | None = None) -> np.ndarray:
    """Sorted unique tile rows found by the compressed index for any of the query rotations."""
    ids, _ = ann.search(queries, k or ann.config.shortlist, nprobe)
    ids = np.unique(ids.ravel())
    return ids[ids >= 0]


def ann_score_tiles(index: TileIndex, queries: np.ndarray, ann: AnnIndex, k: int | None = None,
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `locate.query.tile_similarity`, but exact only on the shortlist; NaN score / rotation -1 elsewhere."""
    import torch

    q = _fp32(queries)
    rows = shortlist(ann, q, k, nprobe)
    # torch converts the fp16 rows several times faster than numpy (no vectorised fp16 there)
    sims = (torch.from_numpy(np.array(index.embeddings[rows])).float() @ torch.from_numpy(q).T).numpy()
    best = np.full(index.n_tiles, np.nan, np.float32)
    which = np.full(index.n_tiles, -1, np.int16)
    if rows.size:
        best[rows] = sims.max(axis=1)
        which[rows] = sims.argmax(axis=1)
    return best, which


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    hits = [len(set(e[:k].tolist()) & set(a[:k].tolist())) for e, a in zip(exact_ids, approx_ids)]
    return float(np.mean(hits)) / k


MIN_ANN_TILES = 256
"""Fewer tiles than a product-quantiser codebook has entries (256): no compressed index."""
ANN_MODES = ("auto", "on", "off")


def ensure_ann(index: TileIndex, mode: str = "auto") -> str | None:
    """The compressed index's path once it exists for `index`, per the policy every front end shares.

    `off`: never. `auto`: only for indexes large enough to need it (`AnnConfig.min_tiles`), and
    quietly not when faiss is missing. `on`: always, or an InputError that says why it cannot be.
    """
    if mode not in ANN_MODES:
        raise InputError(f"Compressed index mode must be one of {', '.join(ANN_MODES)}, got {mode!r}.")
    if mode == "off" or (mode == "auto" and index.n_tiles < min_tiles_for_ann(AnnConfig.min_tiles)):
        return None
    if ann_is_current(index):  # built for this very index: reused like the index itself
        return str(Path(index.folder) / ANN_FILE)
    try:
        import faiss  # noqa: F401
    except ImportError:
        if mode == "on":
            raise InputError("A compressed index needs faiss: `pip install faiss-cpu` (make setup installs it).") \
                from None
        log.warning("faiss is not installed: the index is searched exactly (slower).")
        return None
    if index.n_tiles < MIN_ANN_TILES:
        if mode == "on":
            raise InputError(f"The index has {index.n_tiles} tiles; a compressed index needs at least "
                             f"{MIN_ANN_TILES} (its codebooks have 256 entries). Exact search is fast at this size.")
        return None
    return str(build_ann(index))

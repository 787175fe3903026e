"""The compressed-index figure: recall@10 of IVF-PQ + exact re-rank against exact search, and its memory.

Kept apart from bench_scale (the other scale figures) to keep both files short; called from
there and from `model_backend.bench.run`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.bench.common import AGREEMENT_RASTERS, BATCH, DATA, SEED, augment


def real_index_embeddings(net: Any, cache: Path, per_side: int = 28) -> np.ndarray:
    """Embeddings of real indexes (fp16 rows as stored) of three sample rasters, ~per_side^2 tiles each."""
    from model_backend.core.config import ModelConfig, TilingConfig
    from model_backend.geo.raster import open_raster
    from model_backend.index.build import build_index

    out = []
    for name in AGREEMENT_RASTERS[:3]:
        info = open_raster(str(DATA / name))
        fp = 2 * min(info.width_m, info.height_m) / per_side
        idx = build_index(str(DATA / name), TilingConfig(footprint_m=fp), ModelConfig(batch_size=BATCH),
                          cache_dir=cache, embedder=net)
        out.append(np.asarray(idx.embeddings, dtype=np.float32))
    return np.concatenate(out)


def bench_ann(n_vectors: int = 200_000, noise: float = 0.01, n_queries: int = 500) -> dict[str, Any]:
    """Recall@10 of the compressed index (IVF-PQ + exact re-rank) against exact search, on realistic vectors.

    Realistic: ~2,300 real tile embeddings from real indexes of three sample rasters, each
    repeated with Gaussian noise (sigma `noise` per dimension, cosine ~0.94 to its source) up to
    `n_vectors`; queries are fresh noisy copies. Clustered like a real index, which is what
    makes approximate search hard (random unit vectors would be easy).
    """
    import torch

    from model_backend.index.ann import AnnConfig, AnnIndex, build_ann, recall_at_k
    from model_backend.index.store import TileIndex
    from model_backend.locate.query import tile_similarity
    from model_backend.nn.embedder import EmbeddingModel

    net = EmbeddingModel.load(device="cpu")
    with tempfile.TemporaryDirectory(prefix="cdikt-ann-") as tmp_name:
        tmp = Path(tmp_name)
        base = real_index_embeddings(net, tmp / "cache")
        folder = tmp / "ann_index"
        folder.mkdir()
        np.save(folder / "embeddings.npy", augment(base, n_vectors, noise, SEED))
        emb = np.load(folder / "embeddings.npy", mmap_mode="r")
        zeros = np.zeros(n_vectors, np.int32)
        idx = TileIndex(folder, {"finished": "bench"}, emb, zeros, zeros, None)  # type: ignore[arg-type]
        cfg = AnnConfig(min_tiles=0)
        t0 = time.perf_counter()
        build_ann(idx, cfg)
        build_s = time.perf_counter() - t0
        ann = AnnIndex.load(idx)
        if ann is None:
            raise RuntimeError(f"the compressed index just built in {folder} does not load")
        queries = augment(base, n_queries, noise, SEED + 1).astype(np.float32)
        emb_t = torch.from_numpy(np.asarray(emb)).float()  # 1 GB for 2e5 x 1280: fine for a benchmark
        exact = np.concatenate([torch.topk(emb_t @ torch.from_numpy(q).T, 10, dim=0).indices.T.numpy()
                                for q in np.array_split(queries, 10)])
        del emb_t
        pq_only, _ = ann.search(queries, 10)
        ids, _ = ann.search(queries, cfg.shortlist)
        reranked = []
        for q, cand in zip(queries, ids):
            cand = np.sort(cand[cand >= 0])
            reranked.append(cand[np.argsort(-(np.asarray(emb[cand], np.float32) @ q))[:10]])
        photo = queries[:8]
        t_exact = _best_time(lambda: tile_similarity(idx, photo, ann_min_tiles=n_vectors + 1))
        t_ann = _best_time(lambda: tile_similarity(idx, photo, ann_min_tiles=0))
        file_bytes = (folder / "ann.faiss").stat().st_size
        nlist_1e6 = cfg.lists_for(10**6)
    dim = base.shape[1]
    per_1e6 = (cfg.pq_m + 8) * 10**6 + nlist_1e6 * dim * 4 + 256 * dim * 4
    return {"ann_recall_at_10": round(recall_at_k(exact, np.stack(reranked)), 4),
            "ann_recall_at_10_pq_only": round(recall_at_k(exact, pq_only), 4),
            "ann_kind": f"IVF{ann.meta['nlist']},PQ{cfg.pq_m} + exact re-rank of {cfg.shortlist}, nprobe {cfg.nprobe}",
            "ann_bytes_per_1e6_tiles": int(per_1e6), "ann_file_bytes_per_1e6_tiles": int(file_bytes / n_vectors * 1e6),
            "exact_fp16_bytes_per_1e6_tiles": int(dim * 2 * 10**6), "ann_vectors": n_vectors,
            "ann_real_base_vectors": int(len(base)), "ann_noise_sigma": noise, "ann_queries": n_queries,
            "ann_build_s": round(build_s, 1), "ann_score_s_8rot": round(t_ann, 4),
            "exact_score_s_8rot": round(t_exact, 4)}


def _best_time(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

"""The compressed index (IVF-PQ + exact re-rank): recall against exact search, and when queries use it.

Vectors are real tile embeddings of the sample rasters, repeated with small noise so the set
clusters like a real index (random unit vectors would make approximate search trivially easy).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_backend.bench.common import augment
from model_backend.bench.scale import real_tiles
from model_backend.index.ann import ANN_FILE, ANN_META, AnnConfig, AnnIndex, ann_for, build_ann, recall_at_k, shortlist
from model_backend.index.store import TileIndex
from model_backend.locate.query import tile_similarity

N = 20_000


@pytest.fixture(scope="module")
def base(embedder) -> np.ndarray:
    tiles = real_tiles(224, per_raster=16)
    return np.concatenate([embedder.embed(embedder.normalise(tiles[i:i + 32])) for i in range(0, len(tiles), 32)])


@pytest.fixture(scope="module")
def index(base: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> TileIndex:
    folder = tmp_path_factory.mktemp("ann_index")
    np.save(folder / "embeddings.npy", augment(base, N, 0.01, seed=3))
    pos = np.zeros(N, np.int32)
    idx = TileIndex(folder, {"finished": "test"}, np.load(folder / "embeddings.npy", mmap_mode="r"), pos, pos,
                    None)  # type: ignore[arg-type]  # tile_similarity needs no grid
    build_ann(idx, AnnConfig(min_tiles=0))
    return idx


def test_recall_at_10_against_exact_search(index: TileIndex, base: np.ndarray) -> None:
    ann = AnnIndex.load(index)
    assert ann is not None and ann.meta["n_tiles"] == N
    queries = augment(base, 100, 0.01, seed=4).astype(np.float32)
    emb = np.asarray(index.embeddings, np.float32)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :10]
    found = []
    for q in queries:
        rows = shortlist(ann, q[None])
        found.append(rows[np.argsort(-(emb[rows] @ q))[:10]])
    assert recall_at_k(exact, np.stack(found)) >= 0.99
    assert ann.bytes_per_vector == 160 + 8  # vs 2,560 bytes of fp16


def test_score_tiles_uses_it_above_the_threshold_only(index: TileIndex, base: np.ndarray,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    q = augment(base, 8, 0.01, seed=5).astype(np.float32)  # eight "rotations" of a photo
    exact_best, exact_which = tile_similarity(index, q, ann_min_tiles=N + 1, kernel="fp32")
    assert np.isfinite(exact_best).all()
    best, which = tile_similarity(index, q, ann_min_tiles=N)
    scored = np.isfinite(best)
    assert 0 < scored.sum() < N and np.all(which[~scored] == -1)
    # The shortlist is re-scored exactly: same scores and rotations there, and the best tile is found.
    np.testing.assert_allclose(best[scored], exact_best[scored], atol=1e-3)
    assert np.mean(which[scored] == exact_which[scored]) > 0.99
    assert int(np.nanargmax(best)) == int(np.argmax(exact_best))
    monkeypatch.setenv("CDIKT_ANN_MIN_TILES", str(N + 1))  # the built-in threshold (10^6) is overridable
    assert ann_for(index) is None
    monkeypatch.setenv("CDIKT_ANN_MIN_TILES", "0")
    assert ann_for(index) is not None


def test_stale_or_absent_compressed_index_is_ignored(index: TileIndex, tmp_path: Path) -> None:
    meta = json.loads((index.folder / ANN_META).read_text())
    other = TileIndex(tmp_path, {"finished": "test"}, index.embeddings[:100], index.cols[:100], index.rows[:100],
                      None)  # type: ignore[arg-type]
    assert ann_for(other, 0) is None  # no compressed index in that folder
    (tmp_path / ANN_FILE).write_bytes((index.folder / ANN_FILE).read_bytes())
    (tmp_path / ANN_META).write_text(json.dumps(meta))  # built for N tiles, not 100
    assert AnnIndex.load(other) is None
    best, _ = tile_similarity(other, np.asarray(index.embeddings[:2], np.float32), ann_min_tiles=0)
    assert np.isfinite(best).all()  # exact search instead

"""The index: reused at once, resumed after a cancel, never half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_backend.core.config import ModelConfig, TilingConfig
from model_backend.core.errors import Cancelled
from model_backend.index import build as indexing
from model_backend.index.build import build_index
from model_backend.nn.embedder import EmbeddingModel

TILING = TilingConfig(footprint_m=8.0)  # florida: 40 m square -> 9 x 9 tiles


class CountingEmbedder(EmbeddingModel):
    """The real model, counting how many tiles it was asked to embed."""

    def __init__(self, base: EmbeddingModel) -> None:
        super().__init__(base.net, base.meta, base.device)
        self.count = 0

    def embed(self, batch):  # type: ignore[override]
        self.count += len(batch)
        return super().embed(batch)


@pytest.fixture()
def raster(data_dir: Path) -> str:
    return str(data_dir / "florida_neon_0.10m.tif")


def test_index_is_reused_without_embedding_again(raster: str, embedder, cache_dir: Path) -> None:
    net = CountingEmbedder(embedder)
    first = build_index(raster, TILING, cache_dir=str(cache_dir), embedder=net)
    n = net.count
    assert n == first.n_tiles > 0
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == embedder.sha256
    assert manifest["tiling"]["footprint_m"] == 8.0 and "crs_wkt" in manifest["raster"]
    again = build_index(raster, TILING, cache_dir=str(cache_dir), embedder=net)
    assert net.count == n and again.folder == first.folder
    assert again.embeddings.dtype == np.float16
    norms = np.linalg.norm(np.asarray(again.embeddings, dtype=np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    # A different tiling is a different index.
    other = build_index(raster, TilingConfig(footprint_m=10.0), cache_dir=str(cache_dir), embedder=net)
    assert other.folder != first.folder


def test_cancel_then_resume_embeds_only_the_rest(raster: str, embedder, cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexing, "CHUNK_TILES", 20)  # 3 rows a chunk -> 3 chunks
    model = ModelConfig(batch_size=8)
    net = CountingEmbedder(embedder)
    calls = {"n": 0}

    def cancel_midway() -> bool:
        calls["n"] += 1
        return calls["n"] > 6

    with pytest.raises(Cancelled):
        build_index(raster, TILING, model, cache_dir=str(cache_dir), embedder=net, cancel=cancel_midway)
    folders = list((cache_dir / "indexes").iterdir())
    assert len(folders) == 1
    assert not (folders[0] / "manifest.json").exists()  # never mistaken for a finished index
    assert len(list((folders[0] / "parts").glob("chunk_*.npz"))) == 1
    assert not list(folders[0].rglob("*.tmp"))

    net.count = 0
    resumed = build_index(raster, TILING, model, cache_dir=str(cache_dir), embedder=net)
    assert net.count == resumed.n_tiles - 27  # the first chunk (3 rows x 9 tiles) was kept
    assert not (resumed.folder / "parts").exists()

    fresh = build_index(raster, TILING, model, cache_dir=str(cache_dir / "fresh"), embedder=embedder)
    assert np.array_equal(fresh.cols, resumed.cols) and np.array_equal(fresh.rows, resumed.rows)
    assert np.allclose(np.asarray(fresh.embeddings, np.float32), np.asarray(resumed.embeddings, np.float32),
                       atol=2e-3)


def test_masked_tiles_are_not_indexed(data_dir: Path, embedder, cache_dir: Path) -> None:
    idx = build_index(str(data_dir / "bali_pix4d_0.35m_alpha.tif"), TilingConfig(footprint_m=60),
                      cache_dir=str(cache_dir), embedder=embedder)
    assert 0 < idx.n_tiles < idx.grid.n_tiles


def test_a_size_limit_keeps_every_index_a_locate_just_searched(tmp_path: Path) -> None:
    """A Locate searches several sizes (the tolerance around the footprint); pruning to a limit right
    after it must keep them all - the next photo needs each again - and still free the stale ones."""
    import os

    from model_backend.index.cache import prune_cache

    folders = []
    for i, name in enumerate(["aaaa", "bbbb", "cccc", "dddd"]):  # aaaa oldest ... dddd newest
        f = tmp_path / "indexes" / name
        f.mkdir(parents=True)
        (f / "manifest.json").write_text(json.dumps({"n_tiles": 1, "tiling": {"footprint_m": 40.0 + i}}))
        (f / "embeddings.npy").write_bytes(b"\0" * 1000)
        for p in (f / "embeddings.npy", f / "manifest.json", f):
            os.utime(p, (1e9 + i * 1000, 1e9 + i * 1000))
        folders.append(f)
    removed = prune_cache(tmp_path, max_bytes=0, keep=[folders[1], str(folders[2])])
    assert sorted(Path(e.path).name for e in removed) == ["aaaa"]
    assert [f.exists() for f in folders] == [False, True, True, True]  # dddd: the most recently used

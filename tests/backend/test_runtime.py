"""CPU inference runtimes: the fast path must give the embeddings PyTorch fp32 gives, on real tiles.

An index built by OpenVINO is queried by PyTorch and vice versa (the index key ignores the
runtime), so agreement is checked per vector (cosine >= 0.999) and as retrieval (the top-10
neighbours found with the runtime's vectors are PyTorch's, recall@10 >= 0.99).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from model_backend import runtime as rt
from model_backend.bench_scale import real_tiles
from model_backend.config import TilingConfig
from model_backend.indexing import build_index, index_folder
from model_backend.model import EmbeddingModel
from model_backend.raster import open_raster


@pytest.fixture(scope="module")
def torch_model() -> EmbeddingModel:
    return EmbeddingModel.load(device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def fast_model() -> EmbeddingModel:
    """Module-scoped so it is made before `cache_dir` redirects the cache: the export is reused, not redone."""
    return EmbeddingModel.load(device="cpu", runtime="auto")


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """40 real tiles, 8 from each of five sample rasters (urban, suburban, aerial, drone, with nodata)."""
    return real_tiles(224, per_raster=8)


@pytest.fixture(scope="module")
def reference(torch_model: EmbeddingModel, tiles: np.ndarray) -> np.ndarray:
    return torch_model.embed(torch_model.normalise(tiles))


def _available() -> list[str]:
    names = []
    for name, module in (("openvino", "openvino"), ("onnxruntime", "onnxruntime")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            pass
    return names


@pytest.mark.parametrize("name", _available())
def test_runtime_agrees_with_torch_fp32_on_real_tiles(name: str, tiles: np.ndarray, reference: np.ndarray) -> None:
    model = EmbeddingModel.load(device="cpu", runtime="torch")
    assert model.set_runtime(name) == name
    got = np.concatenate([model.embed(model.normalise(tiles[i:i + 16])) for i in range(0, len(tiles), 16)])
    assert got.shape == reference.shape and got.dtype == np.float32
    cos = np.sum(got * reference, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.999, (name, float(cos.min()))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    # Retrieval: each tile's 10 nearest tiles by the runtime's vectors are those by PyTorch's.
    top_ref = np.argsort(-(reference @ reference.T), axis=1)[:, :10]
    top_got = np.argsort(-(got @ reference.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_ref, top_got)])
    assert recall >= 0.99, (name, recall)
    # Any batch size works (dynamic batch), including one photo crop.
    one = model.embed(model.normalise(tiles[:1]))
    assert one.shape == (1, reference.shape[1]) and float(one[0] @ reference[0]) >= 0.999


def test_auto_prefers_a_fast_runtime_on_cpu_and_torch_on_cuda(torch_model: EmbeddingModel,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    monkeypatch.setenv("CDIKT_RUNTIME", "torch")  # a user's override of 'auto'
    assert rt.select_runner("auto", torch_model.net, spec, torch.device("cpu")) is None
    monkeypatch.delenv("CDIKT_RUNTIME")
    assert rt.select_runner("torch", torch_model.net, spec, torch.device("cpu")) is None
    assert rt.select_runner("auto", torch_model.net, spec, torch.device("cuda")) is None  # no runner is even made
    runner = rt.select_runner("auto", torch_model.net, spec, torch.device("cpu"))
    if _available():
        assert runner is not None and runner.name == _available()[0]
    with pytest.raises(ValueError, match="Unknown runtime"):
        rt.select_runner("tensorrt", torch_model.net, spec, torch.device("cpu"))


def test_missing_or_broken_runtime_falls_back_to_torch(torch_model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    dim = torch_model.meta.dim

    def missing(path: Path, threads: int) -> rt.Runner:
        raise ImportError("No module named 'openvino'")

    class Wrong:
        """Runs, but returns vectors unrelated to the model's: must be caught by the agreement check."""

        name = "onnxruntime"

        def __init__(self, path: Path, threads: int) -> None:
            self.rng = np.random.default_rng(0)

        def __call__(self, x: np.ndarray) -> np.ndarray:
            v = self.rng.standard_normal((len(x), dim), dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setitem(rt.RUNNERS, "openvino", missing)
    monkeypatch.setitem(rt.RUNNERS, "onnxruntime", Wrong)
    with caplog.at_level(logging.INFO, logger="model_backend.runtime"):
        assert rt.select_runner("auto", torch_model.net, spec, torch.device("cpu")) is None
    assert "disagrees with PyTorch" in caplog.text and "Falling back to PyTorch" in caplog.text


def test_export_is_cached_by_weights_size_and_opset(torch_model: EmbeddingModel) -> None:
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    path = rt.export_onnx(torch_model.net, spec)
    mtime = path.stat().st_mtime_ns
    assert rt.export_onnx(torch_model.net, spec) == path and path.stat().st_mtime_ns == mtime  # reused, not redone
    assert spec.weights_sha256[:16] in path.name and "224px" in path.name and f"opset{rt.ONNX_OPSET}" in path.name
    assert rt.probe_path(path).is_file()
    other = rt.RuntimeSpec(torch_model.meta.weights_sha256, 256)
    assert other.filename != spec.filename


def test_index_key_ignores_runtime_and_manifest_records_it(torch_model: EmbeddingModel, fast_model: EmbeddingModel,
                                                           data_dir: Path, cache_dir: Path) -> None:
    raster = str(data_dir / "colorado_hro_0.15m_nodata.tif")
    info = open_raster(raster)
    tiling = TilingConfig(footprint_m=0.45 * min(info.width_m, info.height_m))
    fast = fast_model
    assert index_folder(info, tiling, fast, cache_dir) == index_folder(info, tiling, torch_model, cache_dir)
    idx = build_index(raster, tiling, cache_dir=cache_dir, embedder=fast)
    assert idx.manifest["runtime"] == fast.runtime and idx.manifest["model"]["config"]["runtime"] == "auto"


def test_cli_takes_a_runtime() -> None:
    from model_backend.cli import build_parser

    assert build_parser().parse_args(["index", "r.tif", "--runtime", "torch"]).runtime == "torch"
    assert build_parser().parse_args(["locate", "r.tif", "p.jpg", "--out", "o"]).runtime == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "r.tif", "--runtime", "tensorrt"])

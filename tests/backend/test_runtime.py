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

from model_backend.bench.scale import real_tiles
from model_backend.core import machine
from model_backend.core.config import TilingConfig
from model_backend.geo.raster import open_raster
from model_backend.index.build import build_index, index_folder
from model_backend.nn import runtime as rt
from model_backend.nn import runtime_select as rs
from model_backend.nn.embedder import EmbeddingModel


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


def test_auto_runs_the_runtime_measured_fastest_on_this_machine_and_torch_on_cuda(
        torch_model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    monkeypatch.setenv("CDIKT_RUNTIME", "torch")  # a user's override of 'auto'
    assert rs.select_runner("auto", torch_model.net, spec, torch.device("cpu")) is None
    monkeypatch.delenv("CDIKT_RUNTIME")
    assert rs.select_runner("torch", torch_model.net, spec, torch.device("cpu")) is None
    assert rs.select_runner("auto", torch_model.net, spec, torch.device("cuda")) is None  # no runner is even made
    with pytest.raises(ValueError, match="Unknown runtime"):
        rs.select_runner("tensorrt", torch_model.net, spec, torch.device("cpu"))
    # First use on a machine: every candidate is measured, the fastest kept, the figures stored.
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path / "machine"))
    with caplog.at_level(logging.INFO, logger="model_backend.nn.runtime_select"):
        runner = rs.select_runner("auto", torch_model.net, spec, torch.device("cpu"))
    stored = machine.profile()["choices"][rs.runtime_topic(spec, None)]
    rates = stored["tiles_per_s"]
    assert set(rates) == set(rs.CANDIDATES) and rates["torch"] > 0
    for name in _available():
        assert rates[name] > 0
    if "onnxruntime" in _available():  # never slower than ONNX Runtime's defaults, as measured
        assert rates["onnxruntime-defaults"] > 0 and rates[stored["choice"]] >= rates["onnxruntime-defaults"]
    assert stored["choice"] == rs.choose(rates)
    assert rt.runner_label(runner) == stored["choice"]
    assert "Measuring the CPU runtimes once" in caplog.text and "the fastest measured on this machine" in caplog.text
    # Remembered: the next load (another weights file of the same network) measures nothing.
    monkeypatch.setattr(rs, "measure_runtimes", lambda *_a, **_k: pytest.fail("measured twice"))
    other = rt.RuntimeSpec("another-adapted-model", torch_model.meta.input_size)
    assert rs.runtime_topic(other, None) == rs.runtime_topic(spec, None)
    again = rs.select_runner("auto", torch_model.net, spec, torch.device("cpu"))
    assert rt.runner_label(again) == stored["choice"]


def test_ranks_of_a_torchrun_job_never_measure(torch_model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """Ranks share the cores: a measurement in each would time the others. They use what is stored, else
    ONNX Runtime's defaults, and store nothing."""
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path / "machine"))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rs, "measure_runtimes", lambda *_a, **_k: pytest.fail("measured in a rank"))
    runner = rs.select_runner("auto", torch_model.net, spec, torch.device("cpu"))
    if "onnxruntime" in _available():
        assert rt.runner_label(runner) == "onnxruntime-defaults"
    assert machine.profile()["choices"] == {}


def test_choice_keeps_onnxruntime_defaults_unless_clearly_beaten() -> None:
    assert rs.choose({"openvino": 101.0, "onnxruntime-defaults": 100.0, "torch": 30.0}) == "onnxruntime-defaults"
    assert rs.choose({"openvino": 110.0, "onnxruntime-defaults": 100.0}) == "openvino"
    assert rs.choose({"openvino": 110.0, "torch": 30.0}) == "openvino"  # no ONNX Runtime here
    assert rs.choose({"torch": 30.0}) == "torch" and rs.choose({}) == "torch"


def test_defaults_run_a_photos_crops_on_a_twin_that_stops_spinning(tiles: np.ndarray,
                                                                     torch_model: EmbeddingModel) -> None:
    """ONNX Runtime's defaults spin on after a run; the scoring after a photo's embedding paid for it."""
    pytest.importorskip("onnxruntime")
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    runner = rt.make_runner("onnxruntime-defaults", torch_model.net, spec)
    assert rt.runner_label(runner) == "onnxruntime-defaults"
    with pytest.raises(RuntimeError):  # batches: the yardstick itself, no such setting
        runner.session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    x = torch_model.normalise(tiles[:24]).numpy()
    big, small = runner(x), runner(x[:8])
    assert runner._small.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    assert rt.min_cosine(big[:8], small) > 0.99999
    u8 = rt.uint8_runner(runner, torch_model.meta.mean, torch_model.meta.std, torch_model.meta.input_size)
    assert u8 is not None and rt.runner_label(u8) == "onnxruntime-defaults"


def test_missing_or_broken_runtime_falls_back_to_torch(torch_model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    spec = rt.RuntimeSpec(torch_model.meta.weights_sha256, torch_model.meta.input_size)
    dim = torch_model.meta.dim

    def missing(path: Path, threads: int, **_settings) -> rt.Runner:
        raise ImportError("No module named 'openvino'")

    class Wrong:
        """Runs, but returns vectors unrelated to the model's: must be caught by the agreement check."""

        name = "onnxruntime"

        def __init__(self, path: Path, threads: int, **_settings) -> None:
            self.rng = np.random.default_rng(0)

        def __call__(self, x: np.ndarray) -> np.ndarray:
            v = self.rng.standard_normal((len(x), dim), dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setitem(rt.RUNNERS, "openvino", missing)
    monkeypatch.setitem(rt.RUNNERS, "onnxruntime", Wrong)
    # A choice measured earlier (openvino) that no longer works falls through to the next, then PyTorch.
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path / "machine"))
    machine.remembered(rs.runtime_topic(spec, None), lambda: {
        "choice": "openvino", "tiles_per_s": {"openvino": 250.0, "onnxruntime": 240.0, "torch": 60.0}})
    with caplog.at_level(logging.INFO, logger="model_backend.nn.runtime_select"):
        assert rs.select_runner("auto", torch_model.net, spec, torch.device("cpu")) is None
    assert "disagrees with PyTorch" in caplog.text and "Falling back to PyTorch" in caplog.text
    # Measured afresh with both broken: neither is chosen, PyTorch is.
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path / "machine2"))
    assert rs.select_runner("auto", torch_model.net, spec, torch.device("cpu")) is None
    stored = machine.profile()["choices"][rs.runtime_topic(spec, None)]
    assert stored["choice"] == "torch"
    assert set(stored["errors"]) == {"openvino", "onnxruntime", "onnxruntime-defaults"}


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


@pytest.mark.parametrize("name", _available())
def test_uint8_input_runner_matches_float_input_and_torch(name: str, tiles: np.ndarray,
                                                          reference: np.ndarray) -> None:
    """Indexing feeds the runtime uint8 tiles and lets its graph normalise: the same vectors as the float path."""
    model = EmbeddingModel.load(device="cpu", runtime="torch")
    assert model.set_runtime(name) == name
    u8 = rt.uint8_runner(model.runner, model.meta.mean, model.meta.std, model.meta.input_size)
    assert u8 is not None and u8.name == name
    assert rt.uint8_runner(model.runner, model.meta.mean, model.meta.std, model.meta.input_size) is u8  # made once
    chw = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
    got = np.concatenate([u8(chw[i:i + 16]) for i in range(0, len(chw), 16)])
    floats = np.concatenate([model.embed(model.normalise(tiles[i:i + 16])) for i in range(0, len(tiles), 16)])
    assert got.shape == reference.shape and got.dtype == np.float32
    assert np.abs(got - floats).max() < 1e-5  # same input values: only the engine's own rounding differs
    cos = np.sum(got * reference, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.999, (name, float(cos.min()))
    # The numpy twin of the graph's normalisation is EmbeddingModel.normalise's arithmetic, bit for bit.
    np.testing.assert_array_equal(rt.normalise_nchw(chw[:2], model.meta.mean, model.meta.std),
                                  model.normalise(tiles[:2]).numpy())  # NCHW: a runner is set


def test_uint8_runner_is_none_when_the_runtime_cannot_or_disagrees(caplog: pytest.LogCaptureFixture) -> None:
    class Plain:
        """A runner with no uint8 variant (like a test double): the reader keeps normalising."""

        name = "onnxruntime"

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return np.ones((len(x), 4), np.float32) / 2

    class Unrelated(Plain):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            v = np.random.default_rng(1).standard_normal((len(x), 4)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    class Broken(Plain):
        """Its uint8 variant gives other vectors than its float input does: must be refused."""

        def with_uint8_input(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Plain:
            return Unrelated()

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert rt.uint8_runner(Plain(), mean, std, 32) is None  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="model_backend.nn.runtime"):
        assert rt.uint8_runner(Broken(), mean, std, 32) is None  # type: ignore[arg-type]
    assert "uint8 input unusable" in caplog.text and "disagrees" in caplog.text


def test_index_is_built_from_uint8_batches_and_matches_the_float_path(fast_model: EmbeddingModel, data_dir: Path,
                                                                       cache_dir: Path) -> None:
    """The uint8 path is taken when the runtime allows it, and gives the float path's index up to fp16 rounding."""
    from model_backend.index import build as indexing

    if fast_model.runner is None:
        pytest.skip("no CPU runtime installed")

    class FloatPath(EmbeddingModel):
        """Overrides `embed`, so indexing must call it (normalising in the reader) instead of the uint8 path."""

        def embed(self, batch):  # type: ignore[override]
            return super().embed(batch)

    floats = FloatPath(fast_model.net, fast_model.meta, fast_model.device)
    floats.runner = fast_model.runner
    assert indexing.uint8_embedder(fast_model) is not None and indexing.uint8_embedder(floats) is None
    raster = str(data_dir / "bali_pix4d_0.35m_alpha.tif")  # alpha mask: filled pixels are part of the input too
    info = open_raster(raster)
    tiling = TilingConfig(footprint_m=0.25 * min(info.width_m, info.height_m))
    a = build_index(raster, tiling, cache_dir=cache_dir / "u8", embedder=fast_model)
    b = build_index(raster, tiling, cache_dir=cache_dir / "f32", embedder=floats)
    assert a.n_tiles == b.n_tiles > 10
    assert np.array_equal(a.cols, b.cols) and np.array_equal(a.rows, b.rows)
    ea, eb = np.asarray(a.embeddings, np.float32), np.asarray(b.embeddings, np.float32)
    assert np.abs(ea - eb).max() <= 2.5e-4  # at most one fp16 step of values below 0.5
    assert (ea != eb).mean() < 0.05

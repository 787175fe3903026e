"""Damaged caches and weights: rebuilt with a warning, or refused in one line; never a wrong answer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import FOOTPRINT, RASTER, json_lines, one_line_error, run_cli


@pytest.fixture(scope="module")
def embedder():
    from model_backend.nn.embedder import EmbeddingModel

    return EmbeddingModel.load(device="cpu", runtime="torch")


def _build(cache: Path, embedder):
    from model_backend.core.config import TilingConfig
    from model_backend.index.build import build_index

    return build_index(str(RASTER), TilingConfig(footprint_m=FOOTPRINT), cache_dir=str(cache), embedder=embedder)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 2, len(data), 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_row(path: Path) -> None:
    emb = np.load(path)
    emb[3] = np.nan
    np.save(path, emb)


def _off_grid(path: Path) -> None:
    pos = np.load(path)
    pos[0, 0] = 10_000
    np.save(path, pos)


def _drop_rows(path: Path) -> None:
    np.save(path, np.load(path)[:-2])


def _edit_manifest(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["n_tiles"] += 7
    path.write_text(json.dumps(doc))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "flipped bytes": ("embeddings.npy", _flip_bytes),
    "a NaN row": ("embeddings.npy", _nan_row),
    "a tile off the grid": ("tiles.npy", _off_grid),
    "rows differ from tiles": ("tiles.npy", _drop_rows),
    "an edited manifest": ("manifest.json", _edit_manifest),
    "a truncated file": ("embeddings.npy", _truncate),
    "a manifest that is not JSON": ("manifest.json", lambda p: p.write_text("{not json")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_index_is_rebuilt_not_believed(case: str, tmp_path: Path, embedder, caplog) -> None:
    from model_backend.index.store import TileIndex

    clean = _build(tmp_path / "cache", embedder)
    reference = np.asarray(clean.embeddings, np.float32)
    name, damage = DAMAGE[case]
    damage(clean.folder / name)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is asserted below
        TileIndex.open(clean.folder)
    assert type(info.value).__name__ == "CorruptIndex"
    with caplog.at_level("WARNING"):
        rebuilt = _build(tmp_path / "cache", embedder)
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert rebuilt.folder == clean.folder
    np.testing.assert_allclose(np.asarray(rebuilt.embeddings, np.float32), reference, atol=2e-3)


def test_locate_after_damage_answers_from_a_rebuilt_index(photo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_cli("locate", RASTER, photo, "--out", tmp_path / "a", "--footprint-m", FOOTPRINT, cache=cache)
    assert first.returncode == 0, first.stderr
    folder = next(f for f in (cache / "indexes").iterdir() if f.is_dir())
    _flip_bytes(folder / "embeddings.npy")
    second = run_cli("locate", RASTER, photo, "--out", tmp_path / "b", "--footprint-m", FOOTPRINT, cache=cache)
    assert second.returncode == 0, second.stderr
    a, b = json_lines(first.stdout)[0], json_lines(second.stdout)[0]
    assert -1.0 <= b["score"] <= 1.0 and (b["best_x"], b["best_y"]) == (a["best_x"], a["best_y"])


def _damaged_copy(tmp_path: Path, how: str) -> Path:
    """The shipped model re-saved as the engine saves models (with its tensors' checksum), then damaged:
    one NaN in a tensor ("nan", the checksum left out so only the values can tell), or 2000 bytes of
    tensor data flipped ("flipped", all values still finite)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from model_backend.nn.weights import DIGEST_KEY, default_weights_path, tensors_digest

    src = default_weights_path()
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != DIGEST_KEY}
    if how == "nan":
        name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 100)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    else:
        meta[DIGEST_KEY] = tensors_digest(tensors)
    out = tmp_path / f"model_{how}.safetensors"
    save_file(tensors, str(out), metadata=meta)
    if how == "flipped":
        data = bytearray(out.read_bytes())
        for i in range(len(data) - 5000, len(data) - 1000, 2):  # tensor bytes, well past the header
            data[i] ^= 0x01  # low mantissa bits: finite values, subtly wrong
        out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("how, phrase", [("nan", "nan or infinite"), ("flipped", "checksum")])
def test_damaged_weights_are_refused_in_one_line(how: str, phrase: str, tmp_path: Path) -> None:
    weights = _damaged_copy(tmp_path, how)
    proc = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, "--weights", weights, cache=tmp_path / "cache")
    one_line_error(proc, weights.name, "damaged", phrase)
    assert not (tmp_path / "cache" / "indexes").exists() or not any((tmp_path / "cache" / "indexes").rglob("*.npy"))


def test_a_model_that_gives_nan_never_reaches_the_cache(tmp_path: Path) -> None:
    """Weights that pass the file checks but compute NaN (here set in memory): refused, nothing cached."""
    from model_backend.core.errors import InputError
    from model_backend.nn.embedder import EmbeddingModel

    net = EmbeddingModel.load(device="cpu", runtime="torch")
    with torch.no_grad():
        next(p for p in net.net.parameters() if p.dim() > 1).fill_(float("nan"))
    with pytest.raises(InputError, match="invalid \\(NaN\\) embeddings"):
        _build(tmp_path / "cache", net)
    assert not list((tmp_path / "cache").rglob("manifest.json"))
    assert not list((tmp_path / "cache").rglob("embeddings.npy"))


def test_a_damaged_runtime_export_is_replaced_not_used(tmp_path: Path) -> None:
    """A corrupt cached ONNX file: the agreement check refuses it (NaN included) and it is made again."""
    cache = tmp_path / "cache"
    own = {"CDIKT_RUNTIMES_DIR": str(cache / "runtimes")}  # its own exports: this test damages them
    first = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, "--runtime", "onnxruntime", cache=cache, env=own)
    assert first.returncode == 0, first.stderr
    onnx = next((cache / "runtimes").glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:2048])
    second = run_cli("index", RASTER, "--footprint-m", 50.0, "--runtime", "onnxruntime", "-v", cache=cache, env=own)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    from model_backend.index.store import TileIndex

    for folder in (cache / "indexes").iterdir():
        if folder.is_dir():
            emb = np.asarray(TileIndex.open(folder).embeddings, np.float32)
            assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=0.01)
    shutil.rmtree(cache)


def test_a_runtime_that_gives_nan_is_refused(tmp_path: Path, embedder) -> None:
    """`cos < 0.999` is False for NaN, so a NaN-giving runtime passed the check; now it is refused
    (and its cached export removed), and the model falls back to PyTorch."""
    from model_backend.nn import runtime
    from model_backend.nn.runtime import RuntimeSpec, make_runner

    spec = RuntimeSpec(embedder.meta.weights_sha256, embedder.meta.input_size, embedder.meta.architecture,
                       embedder.meta.pooling)
    real = runtime.RUNNERS["onnxruntime"]

    def poisoned(path: Path, threads: int):  # the real ONNX Runtime session, its outputs turned to NaN
        session = real(path, threads)

        class Poisoned:
            name = "onnxruntime"

            def __call__(self, x: np.ndarray) -> np.ndarray:
                return session(x) * np.nan

        return Poisoned()

    runtime.RUNNERS["onnxruntime"] = poisoned
    try:
        with pytest.raises(RuntimeError, match="disagrees with PyTorch"):
            make_runner("onnxruntime", embedder.net, spec, 1, tmp_path)
    finally:
        runtime.RUNNERS["onnxruntime"] = real
    assert not list(tmp_path.glob("*.onnx"))  # removed: the next run exports it again
    assert make_runner("onnxruntime", embedder.net, spec, 1, tmp_path) is not None

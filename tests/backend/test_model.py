"""The embedding model: the default weights' key mapping, weights formats, and what embed() promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.windows import Window

from model_backend.core.dist import resolve_device
from model_backend.core.errors import InputError
from model_backend.nn import embedder as model_mod
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.weights import (
    DEFAULT_WEIGHTS_SHA256,
    imagenet_weights_path,
    map_deepsort_keys,
    read_weights,
    sha256_file,
)


@pytest.fixture(scope="module")
def embedder() -> EmbeddingModel:
    """The ImageNet MobileNetV2 file these tests are about (the default is now the trained CDIKTNet)."""
    return EmbeddingModel.load(str(imagenet_weights_path()), device="cpu")


@pytest.fixture(scope="module")
def tiles(data_dir: Path) -> np.ndarray:
    """(4, 224, 224, 3) uint8: the four quadrants of a real orthophoto, as the index sees tiles."""
    with rasterio.open(data_dir / "florida_neon_0.10m.tif") as ds:
        out = []
        for x0, y0 in ((0, 0), (200, 0), (0, 200), (200, 200)):
            rgb = ds.read((1, 2, 3), window=Window(x0, y0, 200, 200)).transpose(1, 2, 0)
            out.append(np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR)))
    return np.stack(out)


@pytest.fixture(scope="module")
def features_state(embedder) -> dict[str, torch.Tensor]:
    """The default model's torchvision-named `features` tensors, contiguous copies (CPU nets run channels_last)."""
    return {k: v.detach().clone().contiguous() for k, v in embedder.net.features.state_dict().items()}


@pytest.fixture(scope="module")
def default_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The default file's tensors (prefixes stripped, as the loader sees them) and torchvision's targets."""
    import torchvision

    state, meta = read_weights(imagenet_weights_path())
    assert meta.weights_sha256 == DEFAULT_WEIGHTS_SHA256
    return state, torchvision.models.mobilenet_v2(weights=None).features.state_dict()


@pytest.fixture(scope="module")
def reference(embedder, tiles: np.ndarray) -> np.ndarray:
    return embedder.embed(embedder.normalise(tiles))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_default_weights_file_is_the_pinned_one() -> None:
    path = imagenet_weights_path()
    assert path.is_file(), "run `make setup` to install the default weights"
    assert sha256_file(path) == DEFAULT_WEIGHTS_SHA256


def test_deepsort_keys_map_onto_torchvision_features(default_state) -> None:
    state, target = default_state
    assert any(k not in target for k in state)  # the file really uses the flat deep-sort layout
    mapped = map_deepsort_keys(state, target)
    assert list(mapped) == list(target)  # every torchvision tensor is filled, in order
    for (sk, sv), (dk, dv) in zip(state.items(), target.items()):
        assert mapped[dk] is sv
        assert tuple(sv.shape) == tuple(dv.shape), (sk, dk)
        # Same block and same kind of tensor: the positional mapping never crosses a layer boundary.
        assert sk.split(".")[0] == dk.split(".")[0], (sk, dk)
        assert sk.rsplit(".", 1)[-1] == dk.rsplit(".", 1)[-1], (sk, dk)


def test_our_mobilenet_features_are_torchvisions_layer_for_layer(default_state, tiles: np.ndarray) -> None:
    """`nn.mobilenet` stands in for torchvision's MobileNetV2 (whose import costs seconds): the same keys and
    shapes, and with the same tensors the same feature maps."""
    import torchvision

    from model_backend.nn.mobilenet import mobilenet_v2_features

    ours, theirs = mobilenet_v2_features().eval(), torchvision.models.mobilenet_v2(weights=None).features.eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    state = map_deepsort_keys(default_state[0], theirs.state_dict())
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x = torch.from_numpy(tiles[:2]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_loading_and_running_the_default_model_imports_no_torchvision(tmp_path: Path) -> None:
    """A fresh interpreter, as a CLI run or QGIS's first Locate starts: torchvision stays out (~2.5 s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from model_backend.nn.embedder import EmbeddingModel; "
            "m = EmbeddingModel.load(None, 'cpu', runtime='torch'); "
            "m.embed(m.normalise(np.zeros((1, 224, 224, 3), np.uint8))); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torchvision', 'timm')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_mapping_refuses_a_changed_shape_or_count(default_state) -> None:
    state, target = default_state
    keys = list(state)
    bad = dict(state)
    bad[keys[10]] = torch.zeros(tuple(state[keys[10]].shape) + (1,))
    with pytest.raises(InputError, match="does not fit"):
        map_deepsort_keys(bad, target)
    short = dict(list(state.items())[:-1])
    with pytest.raises(InputError, match="tensors"):
        map_deepsort_keys(short, target)


def test_embed_is_normalised_deterministic_and_shaped(embedder, tiles: np.ndarray, reference: np.ndarray) -> None:
    x = embedder.normalise(tiles)
    assert tuple(x.shape) == (4, 3, 224, 224) and x.dtype == torch.float32
    a = embedder.embed(x)
    b = reference
    assert a.shape == (4, embedder.meta.dim) == (4, 1280) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)
    # Different places give different vectors (a constant embedding would also be "normalised").
    assert _cosines(a[:1], a[1:2])[0] < 0.999
    assert embedder.sha256 == DEFAULT_WEIGHTS_SHA256


def test_safetensors_round_trip_keeps_embeddings_and_meta(embedder, features_state, tiles: np.ndarray,
                                                          reference: np.ndarray, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    meta = {k: v for k, v in embedder.meta.to_dict().items() if k not in ("weights_sha256", "weights_name")}
    path = tmp_path / "cdikt.safetensors"
    save_file(features_state, str(path), metadata={"cdikt_meta": json.dumps(meta)})
    loaded = EmbeddingModel.load(str(path), device="cpu")
    assert loaded.meta.weights_sha256 == sha256_file(path) != DEFAULT_WEIGHTS_SHA256
    assert loaded.meta.weights_name == path.name
    assert loaded.meta.mean == embedder.meta.mean and loaded.meta.pooling == "gem"
    got = loaded.embed(loaded.normalise(tiles))
    assert _cosines(reference, got).min() >= 0.9999


def test_pth_with_module_prefixes_loads(features_state, tiles: np.ndarray, reference: np.ndarray,
                                        tmp_path: Path) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.features.{k}": v for k, v in features_state.items()}}, path)
    loaded = EmbeddingModel.load(str(path), device="cpu")
    assert loaded.meta.weights_sha256 == sha256_file(path)
    got = loaded.embed(loaded.normalise(tiles))
    assert _cosines(reference, got).min() >= 0.9999


class _NotWeights:
    """Any pickled object: weights_only loading must refuse it instead of running its code."""


def test_bad_weights_files_give_input_errors(features_state, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("junk.pth", "junk.safetensors"):
        p = tmp_path / name
        p.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(InputError, match=name):
            EmbeddingModel.load(str(p), device="cpu")
    pickled = tmp_path / "object.pth"
    torch.save({"thing": _NotWeights()}, pickled)
    with pytest.raises(InputError, match="not a PyTorch weights file"):
        EmbeddingModel.load(str(pickled), device="cpu")
    # torchvision names but one wrong shape: refused, not a RuntimeError traceback.
    wrong = dict(features_state)
    first = next(iter(wrong))
    wrong[first] = torch.zeros(1, 1, 1, 1)
    shaped = tmp_path / "wrong_shape.pth"
    torch.save(wrong, shaped)
    with pytest.raises(InputError, match="wrong_shape.pth"):
        EmbeddingModel.load(str(shaped), device="cpu")
    with pytest.raises(InputError, match="not found"):
        EmbeddingModel.load(str(tmp_path / "missing.pth"), device="cpu")
    with pytest.raises(InputError, match="folder"):
        EmbeddingModel.load(str(tmp_path), device="cpu")


def test_cuda_without_a_gpu_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(InputError):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"


def test_architectures_come_from_a_registry_and_a_new_one_is_one_builder(tmp_path: Path) -> None:
    """EmbeddingModel.load asks the registry; a file naming an unknown architecture gets a clear error,
    and registering a builder (what a new module in nn/architectures does) is all a new one needs."""
    import json

    from safetensors.torch import save_file
    from torch import nn

    from model_backend.core.errors import InputError
    from model_backend.nn import architectures
    from model_backend.nn.architectures import _BUILDERS, register

    assert architectures.architectures() == ["cdiktnet", "mobilenet_v2"]
    meta = {"architecture": "tiny_test_net", "input_size": 32, "dim": 8, "pooling": "gem"}
    path = tmp_path / "tiny.safetensors"
    save_file({"proj.weight": torch.randn(8, 3), "proj.bias": torch.zeros(8)}, str(path),
              metadata={"cdikt_meta": json.dumps(meta)})
    with pytest.raises(InputError, match="'tiny_test_net' model; this version knows cdiktnet, mobilenet_v2"):
        EmbeddingModel.load(str(path), "cpu", runtime="torch")

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.proj(x.mean(dim=(-2, -1))), dim=1)

    @register("tiny_test_net")
    def build(state, meta, name):
        net = Tiny()
        net.load_state_dict(state)
        return net

    try:
        model = EmbeddingModel.load(str(path), "cpu", runtime="torch")
        out = model.embed(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 8) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert model.meta.architecture == "tiny_test_net"
    finally:
        _BUILDERS.pop("tiny_test_net", None)

"""Dropping colour by folding luminance into the first convolution: exact, idempotent, chosen by the pairs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from model_backend.bench.adapt import IMAGENET, make_labelled_photos
from model_backend.geo.raster import open_raster
from model_backend.learn.adapt import load_trainable
from model_backend.learn.adapt.look import LUMA, LookChoice, choose_look, fold_luminance, sees_luminance
from model_backend.learn.adapt.train import sample_tile_centres
from model_backend.learn.labels import read_labels, resolve_labels
from model_backend.nn.cdiktnet import CDIKTNet

DATA = Path(__file__).resolve().parents[1] / "data"


def _normalise(model: CDIKTNet, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _grey(x: torch.Tensor) -> torch.Tensor:
    g = sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))
    return g.expand(-1, 3, -1, -1)


def _first_layer(model: CDIKTNet) -> torch.nn.Module:
    if hasattr(model.backbone, "features"):
        return model.backbone.features[0]  # MobileNetV2: conv, BatchNorm, ReLU6
    return model.backbone.model.stem  # ConvNeXt: patchify conv with bias, LayerNorm


@pytest.mark.parametrize("name", ["mobilenet_v2", "convnext_atto"])
def test_folded_model_on_colour_equals_original_on_grey(name: str) -> None:
    torch.manual_seed(0)
    model = (load_trainable(str(IMAGENET)) if name == "mobilenet_v2" else CDIKTNet(name, n_classes=0)).eval()
    folded = fold_luminance(copy.deepcopy(model)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = _first_layer(model)(_normalise(model, _grey(x)))
        got = _first_layer(folded)(_normalise(folded, x))
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # zero padding differs at the border
    assert torch.allclose(got[inner], want[inner], atol=1e-4)
    with torch.no_grad():  # and the whole network ignores colour: two images of one grey embed alike
        y = _grey(x)
        a, b = folded.embed(_normalise(folded, x)), folded.embed(_normalise(folded, y))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(model.embed(_normalise(model, x)), model.embed(_normalise(model, y)), atol=1e-3)


def test_fold_is_idempotent_and_detected() -> None:
    model = load_trainable(str(IMAGENET)).eval()
    assert not sees_luminance(model)
    once = fold_luminance(copy.deepcopy(model))
    assert sees_luminance(once)
    twice = fold_luminance(copy.deepcopy(once))
    for (k, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


@pytest.mark.slow
def test_choose_look_ranks_training_pairs_under_both_looks(tmp_path: Path) -> None:
    raster = DATA / "naip_northdakota_5m_2015.tif"
    labels_file = make_labelled_photos(DATA / "naip_northdakota_5m_2020.tif", raster, 4, 400.0, 3, tmp_path,
                                       size=(320, 240))
    info = open_raster(str(raster))
    a = info.affine
    bounds = (a.c, a.f + a.e * info.height, a.c + a.a * info.width, a.f)
    train = resolve_labels(read_labels(labels_file), info.crs_wkt, bounds, raster.name)
    centres = sample_tile_centres(str(raster), 400.0, 20, np.random.default_rng(0))
    model = load_trainable(str(IMAGENET)).eval()
    choice = choose_look(model, str(raster), train, centres, info.crs_wkt, rotations=4)
    assert set(choice.scores) == {"colour", "luminance"}
    assert all(1 / 25 <= v <= 1.0 for v in choice.scores.values())  # mean reciprocal rank among 4 + 20
    best = max(choice.scores, key=lambda k: (choice.scores[k], k == "colour"))
    assert choice.look == best
    assert sees_luminance(model) is False  # choosing never changes the model it was given
    inherited = choose_look(fold_luminance(model), str(raster), train, centres, info.crs_wkt)
    assert inherited == LookChoice("luminance", {}, inherited=True)
    assert "luminance only" in inherited.describe()

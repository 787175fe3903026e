"""CDIKTNet's network and CDIS losses: shapes, the residual block, training signal, inference weights.

Small inputs (64–96 px) and small backbones (MobileNetV2 with the default weights, timm ConvNeXt-Atto
and ResNet-18 with random weights) keep this on CPU in seconds; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.windows import Window

from model_backend.core.errors import InputError
from model_backend.nn.cdiktnet import (
    CDIKTNet,
    CDISLoss,
    CDISLossConfig,
    MultiDilationBlock,
    alignment_loss,
    build_backbone,
    default_backbone_state,
    embed_with_flip,
    save_inference_weights,
    symmetric_info_nce,
)
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.layers import IMAGENET_MEAN, IMAGENET_STD


def _normalise(images: list[np.ndarray]) -> torch.Tensor:
    t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def pairs(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Six (drone, satellite) pairs at 64 px from a real orthophoto.

    Satellite = a 20 m square; drone = the same place rotated by up to ±30°, shifted by up to
    1.2 m and brightened: what CDIS must learn to match.
    """
    rng = np.random.default_rng(3)
    drones, sats = [], []
    with rasterio.open(data_dir / "manila_oam_0.10m.tif") as ds:
        for k in range(6):
            x0, y0 = 100 + (k % 3) * 600, 200 + (k // 3) * 900
            big = Image.fromarray(ds.read((1, 2, 3), window=Window(x0, y0, 400, 400)).transpose(1, 2, 0))
            sats.append(np.asarray(big.crop((100, 100, 300, 300)).resize((64, 64), Image.Resampling.BILINEAR)))
            dx, dy = (int(v) for v in rng.integers(-12, 13, 2))
            angle = float(rng.uniform(-30, 30))
            rot = big.rotate(angle, resample=Image.Resampling.BILINEAR, center=(200 + dx, 200 + dy))
            drone = rot.crop((100 + dx, 100 + dy, 300 + dx, 300 + dy)).resize((64, 64), Image.Resampling.BILINEAR)
            drones.append(np.clip(np.asarray(drone, np.float32) * 1.1 + 8, 0, 255).astype(np.uint8))
    return _normalise(drones), _normalise(sats)


@pytest.fixture(scope="module")
def mobilenet_state() -> dict[str, torch.Tensor]:
    state = default_backbone_state("mobilenet_v2")
    assert state is not None, "run `make setup` to install the default weights"
    return state


@pytest.mark.parametrize(("name", "dim", "size"), [("mobilenet_v2", 1280, 224), ("convnext_atto", 320, 224),
                                                    ("resnet18", 512, 224)])
def test_backbones_give_a_map_and_a_pooled_vector(name: str, dim: int, size: int) -> None:
    net, feat_dim, stride, default_size = build_backbone(name, None)
    assert (feat_dim, stride, default_size) == (dim, 32, size)
    fmap, pooled = net.eval()(torch.randn(2, 3, 64, 64))
    assert tuple(fmap.shape) == (2, dim, 2, 2)
    assert tuple(pooled.shape) == (2, dim)


def test_convnext_tiny_is_the_paper_default_and_names_are_checked() -> None:
    net, dim, stride, size = build_backbone()
    assert (net.name, dim, stride, size, net.pooling) == ("convnext_tiny", 768, 32, 384, "timm_head")
    # ConvNeXt's pooled vector is the LayerNorm'd global average of the last-stage map.
    x = torch.randn(1, 3, 64, 64)
    fmap, pooled = net.eval()(x)
    expected = F.layer_norm(fmap.mean(dim=(-2, -1)), (768,), net.model.head.norm.weight, net.model.head.norm.bias,
                            eps=net.model.head.norm.eps)
    assert torch.allclose(pooled, expected, atol=1e-5)
    with pytest.raises(InputError, match="Unknown backbone"):
        build_backbone("no_such_net_v9")
    with pytest.raises(InputError, match="do not fit"):
        build_backbone("resnet18", {"conv1.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def imagenet_embedder() -> EmbeddingModel:
    """The engine's ImageNet MobileNetV2 model (the default weights are now the trained CDIKTNet)."""
    from model_backend.nn.weights import imagenet_weights_path

    return EmbeddingModel.load(str(imagenet_weights_path()), device="cpu")


def test_mobilenet_backbone_keeps_the_default_embeddings(imagenet_embedder, mobilenet_state, pairs) -> None:
    """Same weights, same graph: CDIKTNet on MobileNetV2 embeds like the engine's ImageNet model."""
    embedder = imagenet_embedder
    net = CDIKTNet("mobilenet_v2", pretrained_state=mobilenet_state).eval()
    x = pairs[1]
    with torch.no_grad():
        ours = net(x)
        ref = embedder.net(x.contiguous(memory_format=torch.channels_last))  # its PyTorch graph, any runtime
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.fixture(scope="module")
def trained(pairs) -> tuple[CDIKTNet, dict[str, float], dict[str, float]]:
    """ResNet-18 CDIKTNet (random start) after three AdamW steps on the six real pairs:
    (net, loss before, loss after). ResNet-18's 512-d map keeps the heads small, so this is quick."""
    torch.manual_seed(0)
    drone, sat = pairs
    labels = torch.arange(drone.shape[0])  # each pair its own location
    net = CDIKTNet("resnet18", n_classes=len(labels)).train()
    loss_fn = CDISLoss(CDISLossConfig.for_dataset("university1652"))

    def measure() -> dict[str, float]:
        torch.manual_seed(123)  # same dropout masks at both measurements
        with torch.no_grad():
            return loss_fn(net(drone, sat), labels).as_floats()

    before = measure()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(3):
        res = loss_fn(net(drone, sat), labels)
        opt.zero_grad()
        res.total.backward()
        assert net.logit_scale.grad is not None  # the temperature is learned
        opt.step()
    return net, before, measure()


def test_training_outputs_have_the_documented_shapes(trained, pairs) -> None:
    drone, sat = pairs
    net = trained[0].train()
    out = net(drone, sat)
    b = drone.shape[0]
    assert tuple(out.drone_pooled.shape) == tuple(out.sat_pooled.shape) == (b, 512)
    assert len(out.drone_logits) == len(out.sat_logits) == 3  # two parts + the global vector
    assert all(tuple(lg.shape) == (b, 6) for lg in out.drone_logits + out.sat_logits)
    assert tuple(out.drone_tokens.shape) == tuple(out.sat_tokens.shape) == (b, 512, 4)  # 2x2 map at 64 px
    assert out.logit_scale is not None and float(out.logit_scale.detach()) > 0
    net.eval()
    with torch.no_grad():
        emb = net(drone)
    assert tuple(emb.shape) == (b, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(b), atol=1e-5)
    flip = embed_with_flip(net, drone)  # CDTS's clustering features: image + mirror, renormalised
    assert tuple(flip.shape) == (b, 512) and torch.allclose(flip.norm(dim=1), torch.ones(b), atol=1e-5)


def test_heads_are_optional_and_views_may_differ_in_size(pairs) -> None:
    drone, sat = pairs
    b = drone.shape[0]
    net = CDIKTNet("convnext_atto", n_classes=0)
    assert math.isclose(float(net.logit_scale.exp().detach()), 1 / 0.07, rel_tol=1e-5)
    out = net(drone, sat)
    assert net.structural is None and out.drone_logits == [] and out.sat_logits == []
    assert tuple(out.drone_tokens.shape) == (b, 512, 4) and tuple(out.drone_pooled.shape) == (b, 320)
    res = CDISLoss()(out, torch.arange(b))  # no heads: the CE term is simply absent
    assert float(res.ce) == 0.0 and torch.isfinite(res.total)
    net.set_n_classes(4)
    assert net.structural is not None and len(net(drone, sat).drone_logits) == 3
    # Views of different sizes run separately through the same backbone; alignment then refuses.
    odd = net(drone, F.interpolate(sat, size=96, mode="bilinear"))
    assert tuple(odd.sat_tokens.shape) == (b, 512, 9)
    with pytest.raises(ValueError, match="same input size"):
        alignment_loss(odd.drone_tokens, odd.sat_tokens)
    # CPU autocast (bf16) runs the same graph; the losses stay finite and float32.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        amp = CDISLoss()(net(drone, sat), torch.arange(b) % 4)
    assert torch.isfinite(amp.total) and amp.total.dtype == torch.float32


def test_multi_dilation_block_averages_its_residual_with_the_input() -> None:
    """Hand-set weights: each branch reads the pixel `d` to the right (its dilation); the 1x1 conv
    copies the two mid channels back and adds 0.5. Output must be ((block) + input) / 2."""
    block = MultiDilationBlock(8)
    with torch.no_grad():
        for br in block.branches:
            br.weight.zero_()
            for o in range(2):
                br.weight[o, o, 1, 2] = 1.0  # centre row, right tap: offset = dilation
        block.expand.weight.zero_()
        for o in range(2):
            block.expand.weight[o, o, 0, 0] = 1.0
        block.expand.bias.fill_(0.5)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        got = block(x)
    shifted = []
    for d in (1, 2, 3):
        s = torch.zeros(1, 2, 7, 7)
        s[..., : 7 - d] = x[:, :2, :, d:]
        shifted.append(s)
    inner = torch.zeros(1, 8, 7, 7)
    inner[:, :2] = torch.relu(sum(shifted) / 3)
    expected = (inner + 0.5 + x) / 2
    assert torch.allclose(got, expected, atol=1e-6)


def test_loss_terms_follow_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    logits = 10.0 * F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    target = torch.arange(5)
    manual = (F.cross_entropy(logits, target, label_smoothing=0.1)
              + F.cross_entropy(logits.t(), target, label_smoothing=0.1)) / 2
    assert torch.allclose(symmetric_info_nce(a, b, 10.0, 0.1), manual)
    t = torch.rand(3, 8, 5)
    assert float(alignment_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(t, -t)) == pytest.approx(2.0, abs=1e-6)
    assert CDISLossConfig.for_dataset("university1652").alignment_weight == 1.3
    assert CDISLossConfig.for_dataset("sues200").alignment_weight == 0.75
    assert CDISLossConfig.for_dataset("raster").alignment_weight == 1.0
    assert CDISLossConfig().ce_weight == 0.1 and CDISLossConfig().label_smoothing == 0.1


def test_a_few_steps_on_real_pairs_reduce_the_cdis_loss(trained) -> None:
    _, before, after = trained
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()]), (before, after)
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    assert after["ce"] < before["ce"], (before, after)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "convnext_atto"])
def test_inference_weights_round_trip_through_embedding_model(backbone: str, trained, mobilenet_state, pairs,
                                                              tmp_path: Path) -> None:
    if backbone == "resnet18":
        net = trained[0]  # trained a few steps: BN statistics moved too
    else:
        torch.manual_seed(1)
        net = CDIKTNet(backbone, pretrained_state=mobilenet_state if backbone == "mobilenet_v2" else None)
        with torch.no_grad():  # off the starting weights, as training would move them
            for p in net.backbone.parameters():
                p.add_(0.01 * torch.randn_like(p))
            net.train()(pairs[0], pairs[1])
    net.eval()
    path = tmp_path / f"cdikt_{backbone}.safetensors"
    meta = save_inference_weights(net, path, {"input_size": 64})
    assert meta["architecture"] == "cdiktnet" and meta["backbone"] == backbone and meta["input_size"] == 64

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        header = json.loads(f.metadata()["cdikt_meta"])
    assert keys and all(k.startswith("backbone.") for k in keys)  # heads are training-only
    assert header["dim"] == net.feat_dim

    loaded = EmbeddingModel.load(str(path), device="cpu", runtime="torch")
    assert (loaded.meta.architecture, loaded.meta.backbone, loaded.meta.dim) == ("cdiktnet", backbone, net.feat_dim)
    assert loaded.meta.input_size == 64 and loaded.meta.pooling == net.backbone.pooling
    x = pairs[0]
    got = torch.from_numpy(loaded.embed(x))
    with torch.no_grad():
        want = net(x)
    assert F.cosine_similarity(got, want, dim=1).min() >= 0.9999


def test_bad_cdiktnet_headers_are_input_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    net = CDIKTNet("resnet18")
    good = {"backbone." + k: v.contiguous() for k, v in net.backbone.state_dict().items()}
    cases = {
        "nobackbone.safetensors": {"architecture": "cdiktnet", "dim": 512},
        "wrongdim.safetensors": {"architecture": "cdiktnet", "backbone": "resnet18", "dim": 768,
                                 "pooling": "timm_head"},
        "wrongnet.safetensors": {"architecture": "cdiktnet", "backbone": "convnext_atto", "dim": 320,
                                 "pooling": "timm_head"},
    }
    for name, meta in cases.items():
        p = tmp_path / name
        save_file(good, str(p), metadata={"cdikt_meta": json.dumps(meta)})
        with pytest.raises(InputError, match=name):
            EmbeddingModel.load(str(p), device="cpu", runtime="torch")

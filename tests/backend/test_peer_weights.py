"""Peer checkpoint key mapping on random tensors of the real ConvNeXt-Tiny shapes (timm, pretrained=False).

Each peer's file is rebuilt the way that peer saves it (Sample4Geo: timm model in `self.model`,
DataParallel's `module.`; MEAN/DMNIL: original Facebook ConvNeXt names under `model_1.convnext.`
beside their heads), written with torch.save, mapped back and loaded strictly into a fresh model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from model_backend.core.errors import InputError
from model_backend.nn.peer_weights import fb_to_timm_convnext, load_peer_checkpoint, map_peer_state_dict


def convnext(num_classes: int = 0, device: str = "meta") -> nn.Module:
    """On the meta device by default: the real shapes and names without seconds of weight init."""
    with torch.device(device):
        return timm.create_model("convnext_tiny", pretrained=False, num_classes=num_classes)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """One real ConvNeXt-Tiny in memory; each round trip wipes it before loading."""
    return convnext(device="cpu")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """Random tensors in every slot of ConvNeXt-Tiny, so a swapped or missed tensor shows."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in convnext().state_dict().items()}


def timm_to_fb(key: str) -> str:
    """Inverse of the Facebook -> timm renaming (how MEAN/DMNIL's hand-written ConvNeXt names tensors)."""
    k = re.sub(r"^stem\.", "downsample_layers.0.", key)
    k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
    k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
    return re.sub(r"^head\.norm\.", "norm.", k)


def assert_loads_exactly(model: nn.Module, mapped: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for v in model.state_dict().values():
            v.zero_()
    model.load_state_dict(mapped, strict=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_sample4geo_round_trip(model, reference, tmp_path: Path) -> None:
    saved = {f"module.model.{k}": v for k, v in reference.items()}
    saved["module.logit_scale"] = torch.tensor(2.659)
    torch.save(saved, tmp_path / "weights_e40_0.9.pth")
    mapped = map_peer_state_dict(load_peer_checkpoint(tmp_path / "weights_e40_0.9.pth"), convnext())
    assert_loads_exactly(model, mapped, reference)


def test_mean_dmnil_round_trip(model, reference) -> None:
    saved = {f"model_1.convnext.{timm_to_fb(k)}": v for k, v in reference.items()}
    assert "model_1.convnext.stages.2.8.pwconv1.weight" in saved and "model_1.convnext.norm.weight" in saved
    saved["model_1.convnext.head.weight"] = torch.randn(1000, 768)   # the ImageNet head they keep
    saved["model_1.convnext.head.bias"] = torch.randn(1000)
    saved["model_1.classifier1.classifier.weight"] = torch.randn(701, 512)
    saved["model_1.MSE.FC11.weight"] = torch.randn(192, 768, 3, 3)
    saved["model_1.proj.layers.0.0.weight"] = torch.randn(1536, 768, 1)
    saved["logit_scale"] = torch.tensor(2.659)
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in saved.items()}, "epoch": 1}
    assert_loads_exactly(model, map_peer_state_dict(checkpoint, model), reference)
    assert all(fb_to_timm_convnext(timm_to_fb(k)) == k for k in reference)


class Wrapped(nn.Module):
    """A model that holds the backbone under a prefix beside its own heads, as CDIKTNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = convnext()
        self.proj = nn.Linear(768, 256)


def test_maps_under_the_target_backbone_prefix(reference) -> None:
    with torch.device("meta"):
        target = Wrapped()   # shapes only: the meta device skips weight init
    mapped = map_peer_state_dict({f"model.{k}": v for k, v in reference.items()}, target)
    assert set(mapped) == {f"backbone.{k}" for k in reference}
    result = target.load_state_dict(mapped, strict=False, assign=True)
    assert sorted(result.missing_keys) == ["proj.bias", "proj.weight"] and not result.unexpected_keys
    with pytest.raises(InputError, match="lacks 2"):
        map_peer_state_dict(reference, target, require_all=True)


def test_classifier_of_another_size_is_dropped(reference) -> None:
    target = convnext(num_classes=701)
    state = {**reference, "head.fc.weight": torch.randn(1000, 768), "head.fc.bias": torch.randn(1000)}
    mapped = map_peer_state_dict(state, target)
    assert "head.fc.weight" not in mapped and len(mapped) == len(reference)
    assert not target.load_state_dict(mapped, strict=False, assign=True).unexpected_keys


@pytest.mark.parametrize("damage, phrase", [
    ("shape", "is (128, 3, 4, 4) but the model's stem.0.weight is (96, 3, 4, 4)"),
    ("truncate", "lacks"),
    ("other", "another architecture"),
    ("empty", "no state dict"),
])
def test_mismatches_are_refused(reference, damage, phrase) -> None:
    state = {f"module.model.{k}": v for k, v in reference.items()}
    if damage == "shape":                      # the stem of ConvNeXt-Base (128 channels) offered to Tiny
        state["module.model.stem.0.weight"] = torch.randn(128, 3, 4, 4)
    elif damage == "truncate":                 # an incomplete file: the last stage is gone
        state = {k: v for k, v in state.items() if ".stages.3." not in k}
    elif damage == "other":                    # torchvision MobileNetV2 features
        import torchvision

        state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    else:
        state = {}
    with pytest.raises(InputError, match=re.escape(phrase)):
        map_peer_state_dict(state, convnext())


def test_unreadable_checkpoint_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        load_peer_checkpoint(bad)
    with pytest.raises(InputError, match="not found"):
        load_peer_checkpoint(tmp_path / "missing.pth")

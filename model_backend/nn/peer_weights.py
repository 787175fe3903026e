"""Bring released checkpoints of peer methods onto our backbone, offline and checked.

Peers built on the same backbones save them under their own names:
- Sample4Geo (`TimmModel`): a timm model in `self.model`, so `model.stem.0.weight`, ...,
  `model.head.norm.weight`, plus `logit_scale`; `module.` in front when saved from DataParallel.
- MEAN / DMNIL (`two_view_net`): `model_1.convnext.` + the original Facebook ConvNeXt names
  (`downsample_layers.0.0.weight`, `stages.0.0.dwconv.weight`, `stages.0.0.pwconv1.weight`,
  `norm.weight`), beside their own heads (`model_1.classifier1.*`, `model_1.MSE.*`, `model_1.proj.*`).
- Plain timm or Facebook ConvNeXt state dicts, possibly wrapped in {"state_dict": ...} or {"model": ...}.
`map_peer_state_dict` strips the wrappers, renames Facebook ConvNeXt keys to timm's, finds where
the backbone sits in the target (e.g. under `backbone.`), drops what the target has no place for
(peer heads, classifier, temperature) and checks every shape, so a ConvNeXt-Base file offered to
a ConvNeXt-Tiny model fails with a message instead of loading garbage or silently nothing.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model_backend.core.errors import InputError

log = logging.getLogger(__name__)

WRAPPERS = ("module.", "_orig_mod.", "model_1.convnext.", "model_1.", "model.", "convnext.", "backbone.",
            "encoder.", "visual.trunk.")
"""Prefixes peers put before backbone keys: DataParallel, torch.compile, MEAN/DMNIL, Sample4Geo, Lightning, CLIP."""


def unwrap_checkpoint(obj: object) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint ({"state_dict"|"model"|"model_state_dict"|"net": ...} or bare)."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model_state_dict", "model", "net")
                          if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise InputError("The checkpoint holds no state dict; save model.state_dict(), not the model.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError("The checkpoint holds no tensors; is it a weights file?")
    return tensors


def load_peer_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a peer's `.pth`/`.pt`/`.bin` (loaded with weights_only: no code runs) or `.safetensors` file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Checkpoint not found: {p}. Check the path.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return unwrap_checkpoint(load_file(str(p)))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:  # torch and safetensors raise many types for a file that is not a checkpoint
        raise InputError(f"{p.name} is not a readable PyTorch checkpoint ({type(exc).__name__}); "
                         "re-save it with torch.save(model.state_dict(), ...).") from None
    return unwrap_checkpoint(obj)


def fb_to_timm_convnext(key: str) -> str:
    """Rename one original (Facebook) ConvNeXt key to timm's name for the same tensor."""
    k = key
    k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
    k = re.sub(r"^norm\.", "head.norm.", k)
    k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
    return k


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in WRAPPERS:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _target_shapes(target: nn.Module | Mapping) -> dict[str, tuple[int, ...]]:
    if isinstance(target, nn.Module):
        return {k: tuple(v.shape) for k, v in target.state_dict().items()}
    out = {}
    for k, v in target.items():
        out[str(k)] = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    return out


def _find_prefix(names: set[str], target: Mapping[str, tuple[int, ...]]) -> str:
    """Where the backbone sits in the target: the prefix under which most source names exist."""
    votes: Counter[str] = Counter()
    for t in target:
        for n in names:
            if t.endswith(n) and (len(t) == len(n) or t[-len(n) - 1] == "."):
                votes[t[: len(t) - len(n)]] += 1
    return votes.most_common(1)[0][0] if votes else ""


def map_peer_state_dict(state: Mapping[str, torch.Tensor], target: nn.Module | Mapping, *,
                        require_all: bool = False) -> dict[str, torch.Tensor]:
    """Peer checkpoint tensors renamed to the target's keys, ready for `load_state_dict`.

    `target` is a model or its state dict (or a {key: shape} mapping). The backbone must load whole:
    every target key under the backbone's prefix, in a top-level module the checkpoint fills, must
    be covered, except classifier layers (a half-loaded backbone is worse than none). With
    `require_all` every target key must be (then `load_state_dict(strict=True)` works). Source
    tensors with no place in the target are dropped and logged. Raises InputError on any shape
    mismatch or when nothing matches.
    """
    src = unwrap_checkpoint(state)
    shapes = _target_shapes(target)
    renamed: dict[str, torch.Tensor] = {}
    fb = any(_strip(k).startswith(("downsample_layers.", "stages.0.0.")) for k in src)
    for k, v in src.items():
        name = _strip(k)
        if fb:
            name = fb_to_timm_convnext(name)
        renamed.setdefault(name, v)
    prefix = _find_prefix(set(renamed), shapes)
    if not prefix and not any(n in shapes for n in renamed):
        sample = next(iter(renamed))
        raise InputError(f"No tensor of the checkpoint fits the model (e.g. {sample}); it is another architecture.")
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for name, v in renamed.items():
        key = prefix + name
        if key not in shapes:
            dropped.append(name)
            continue
        if tuple(v.shape) != shapes[key]:
            if _HEAD.search(name):   # a classifier for another number of classes: not ours to load
                dropped.append(name)
                continue
            raise InputError(f"Checkpoint tensor {name} is {tuple(v.shape)} but the model's {key} is {shapes[key]}: "
                             "the file is another backbone or size (e.g. ConvNeXt-Base for -Tiny).")
        out[key] = v
    under = [k for k in shapes if k.startswith(prefix)]
    if len(out) < 0.5 * len(under):
        raise InputError(f"Only {len(out)} of the model's {len(under)} backbone tensors are in the checkpoint; "
                         "it is another architecture.")
    missing = [k for k in shapes if k not in out and (require_all or _in_backbone(k, prefix, out))]
    if missing:
        raise InputError(f"The checkpoint lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); "
                         "it is a different architecture or an incomplete file.")
    if dropped:
        log.info("Dropped %d checkpoint tensors with no place in the model (e.g. %s)", len(dropped), dropped[0])
    return out


_HEAD = re.compile(r"(^|\.)(head\.fc|fc|classifier|head)\.(weight|bias)$")
"""Classifier layers: a peer saved without one (num_classes=0) still gives a complete backbone."""


def _in_backbone(key: str, prefix: str, loaded: Mapping[str, torch.Tensor]) -> bool:
    """A target key the checkpoint must provide: under the backbone prefix, in a top-level module the
    checkpoint also fills (so a truncated stage is caught), and not a classifier layer."""
    if not key.startswith(prefix) or _HEAD.search(key[len(prefix):]):
        return False
    top = {k[len(prefix):].split(".", 1)[0] for k in loaded}
    return key[len(prefix):].split(".", 1)[0] in top

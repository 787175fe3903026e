"""The architectures an embedding weights file can name, and the factory that builds one.

In the spirit of timm's `create_model`: each module of this package registers a builder under the
`architecture` name that weights files carry in their metadata (`cdikt_meta`), and `create_net`
builds the network for a file. Adding an architecture is adding one module here; nothing else
changes (`EmbeddingModel.load` asks the registry, the index keys and manifests carry the name).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from model_backend.core.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from model_backend.nn.weights import ModelMeta

Builder = Callable[[dict[str, "torch.Tensor"], "ModelMeta", str], "nn.Module"]
"""(state dict, metadata, file name for messages) -> the network in eval mode, weights loaded."""

_BUILDERS: dict[str, Builder] = {}
_loaded = False


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `name` (a weights file's `architecture`) build with the decorated function."""
    def add(builder: Builder) -> Builder:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"architecture {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder
    return add


def _load_all() -> None:
    """Import every module of this package once, so each registers its builder."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def architectures() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def create_net(state: dict[str, torch.Tensor], meta: ModelMeta, name: str) -> nn.Module:
    """The network a weights file describes, with its weights; InputError when it cannot be built."""
    _load_all()
    builder = _BUILDERS.get(meta.architecture)
    if builder is None:
        raise InputError(f"{name} is a {meta.architecture!r} model; this version knows "
                         f"{', '.join(architectures())}. Update the plugin or choose another weights file.")
    return builder(state, meta, name)

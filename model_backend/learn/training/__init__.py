"""Training CDIKTNet: CDIS on pairs, CDTS on unpaired images, in three modes (`python -m model_backend train`).

- `TrainConfig`: one run's settings (validated before anything heavy is loaded);
- `train(config)`: supervised / fewshot / crossdomain wiring (modes.py) over the stages and the
  resumable run state (loop.py); returns a `TrainResult`;
The output is the inference .safetensors `EmbeddingModel` loads, plus FILE.ckpt.pt to resume from.

Names are imported lazily, so the CLI can register `train` (command.py) without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from model_backend.learn.training.config import LAYOUTS, MODES, TrainConfig

_LAZY = {"train": "modes", "TrainResult": "modes", "initial_weights": "modes", "write_inference": "modes",
         "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint"}

__all__ = ["LAYOUTS", "MODES", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""cdikt-qgis engine: tiles a raster, embeds it once, and locates drone photos on it.

No Qt and no QGIS here: the plugin, the Processing algorithms and the CLI all call the same
functions. The public API (docs/CONTRACT.md) is importable from here; names load on first use
(PEP 562), so `import model_backend` stays cheap and loads no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "TilingConfig": "core.config", "ModelConfig": "core.config", "QueryConfig": "core.config",
    "CdiktError": "core.errors", "InputError": "core.errors", "Cancelled": "core.errors",
    "LocateRequest": "core.requests", "IndexRequest": "core.requests", "AdaptRequest": "core.requests",
    "Outcome": "core.requests", "Status": "core.requests", "Failure": "core.requests",
    "open_raster": "geo.raster", "RasterInfo": "geo.raster",
    "make_grid": "geo.tiling", "TileGrid": "geo.tiling",
    "EmbeddingModel": "nn.embedder",
    "build_index": "index.build", "index_raster": "index.build", "TileIndex": "index.store",
    "locate": "locate.pipeline", "locate_photo": "locate.pipeline", "LocateResult": "locate.pipeline",
    "Candidate": "locate.candidates", "TileScores": "locate.scores", "score_tiles": "locate.query",
    "read_labels": "learn.labels", "write_labels": "learn.labels", "ModelRegistry": "learn.versions",
    "adapt_model": "learn.adapt", "adapt": "learn.adapt", "AdaptConfig": "learn.adapt",
    "AdaptResult": "learn.adapt",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f"model_backend.{_API[name]}"), name)
    raise AttributeError(f"module 'model_backend' has no attribute {name!r}")

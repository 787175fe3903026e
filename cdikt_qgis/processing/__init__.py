"""Processing provider "CDIKT": the engine as toolbox algorithms (batch, modeler, qgis_process).

Each algorithm is a thin adapter: typed parameters in, the same ``model_backend`` functions the
CLI and the dock call, Processing outputs back. Importing this package is cheap (qgis.core only);
the engine and torch are imported when an algorithm runs, so the toolbox lists CDIKT even where
torch is missing and says so when an algorithm is started.
"""

from __future__ import annotations

from .provider import CdiktProvider

__all__ = ["CdiktProvider"]

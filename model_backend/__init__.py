"""cdikt-qgis engine: tiles a raster, embeds it once, and locates drone photos on it.

No Qt and no QGIS here: the plugin, the Processing algorithms and the CLI all call the same
functions (`model_backend.locate`), and the engine is tested on its own.
"""

__version__ = "0.1.0"

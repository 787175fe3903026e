"""Rasters and photos as data: validation, ground resolution, the tile grid, strip reads, EXIF.
Torch-free (the plugin reads EXIF on QGIS's main thread). Imports only `core`."""

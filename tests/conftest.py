"""Settings for the whole suite: headless Qt, and no GDAL side files written beside test data."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# QGIS computes band statistics when styling a raster and GDAL would save them as .aux.xml
# next to the file; tests must not modify tests/data.
os.environ.setdefault("GDAL_PAM_ENABLED", "NO")

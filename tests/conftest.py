"""Settings for the whole suite: headless Qt, and no GDAL side files written beside test data."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# QGIS computes band statistics when styling a raster and GDAL would save them as .aux.xml
# next to the file; tests must not modify tests/data.
os.environ.setdefault("GDAL_PAM_ENABLED", "NO")

# Measured per-machine choices (CPU runtime, scoring kernel; model_backend.core.machine) are made once per
# test session in a folder of its own: never read from the developer's profile, never measured per test.
if "CDIKT_MACHINE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CDIKT_MACHINE_DIR"] = tempfile.mkdtemp(prefix="cdikt-machine-")
    atexit.register(shutil.rmtree, os.environ["CDIKT_MACHINE_DIR"], True)
# Likewise the models' ONNX exports (~8 s each): made once per session, not once per test's own cache.
if "CDIKT_RUNTIMES_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CDIKT_RUNTIMES_DIR"] = tempfile.mkdtemp(prefix="cdikt-runtimes-")
    atexit.register(shutil.rmtree, os.environ["CDIKT_RUNTIMES_DIR"], True)

"""Plugin tests on real PyQGIS, headless: one QgsApplication for the session, real widgets.

``HeadlessIface`` implements just the part of QgisInterface the plugin uses, with real Qt
widgets (main window, toolbar, menu, message bar, map canvas), so tests observe what a user
would see instead of asserting on mocked calls.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest

from .qgis_helpers import DATA, HeadlessIface, process_events


@pytest.fixture(scope="session")
def qgis_app(tmp_path_factory: pytest.TempPathFactory):
    """The session's QgsApplication, with settings in a temp folder (never the user's profile)."""
    from qgis.PyQt.QtCore import QCoreApplication, QSettings

    from cdikt_qgis.headless import start_qgis

    app = start_qgis()
    settings_dir = tmp_path_factory.mktemp("qsettings")
    QCoreApplication.setOrganizationName("cdikt-tests")
    QCoreApplication.setApplicationName("cdikt-tests")
    for fmt in (QSettings.NativeFormat, QSettings.IniFormat):
        QSettings.setPath(fmt, QSettings.UserScope, str(settings_dir))
    return app


@pytest.fixture(autouse=True)
def _isolated(qgis_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test: empty project, cleared cdikt/ settings, its own cache folder."""
    from qgis.core import QgsProject, QgsSettings

    monkeypatch.setenv("CDIKT_CACHE_DIR", str(tmp_path / "cache"))
    QgsSettings().remove("cdikt")
    yield
    QgsProject.instance().clear()
    QgsSettings().remove("cdikt")


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh user data folder (model registry, labels of unsaved projects) for the test."""
    monkeypatch.setenv("CDIKT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def iface(qgis_app) -> Iterator[HeadlessIface]:
    i = HeadlessIface()
    yield i
    i.close()
    process_events()


@pytest.fixture(scope="session")
def heatmap_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real heatmap GeoTIFF + matches GeoPackage/GeoJSON over a test raster, without the model.

    Uses the engine's own grid and writers (pure numpy/rasterio/OGR), on the EPSG:28992 raster
    so a national projected CRS is exercised; a band of tiles is left out to create nodata.
    """
    import numpy as np

    from model_backend.core.config import TilingConfig
    from model_backend.geo.raster import open_raster
    from model_backend.geo.tiling import make_grid
    from model_backend.locate.candidates import select_candidates
    from model_backend.locate.export import write_geojson, write_gpkg
    from model_backend.locate.heatmap import write_heatmap
    from model_backend.locate.scores import TileScores

    out = tmp_path_factory.mktemp("heatmap_case")
    raster = str(DATA / "netherlands_aerial_0.25m_epsg28992.tif")
    info = open_raster(raster)
    grid = make_grid(info, TilingConfig(footprint_m=50.0))
    rows, cols = np.meshgrid(np.arange(grid.n_rows), np.arange(grid.n_cols), indexing="ij")
    cols, rows = cols.ravel(), rows.ravel()
    keep = rows < grid.n_rows - 2  # the southern strip stays uncovered -> nodata
    cols, rows = cols[keep], rows[keep]
    cx, cy = grid.n_cols * 0.3, grid.n_rows * 0.4
    scores = (0.9 - 0.05 * np.hypot(cols - cx, rows - cy)).astype(np.float64)
    tile_scores = TileScores(grid, cols, rows, scores)
    heat = write_heatmap(str(out / "view.heatmap.tif"), tile_scores)
    cands = select_candidates(tile_scores, top_k=5, nms_iou=0.1)
    props = {"photo": "view.jpg", "footprint_m": 50.0}
    gj = write_geojson(str(out / "view.matches.geojson"), cands, info.crs_wkt, props)
    gp = write_gpkg(str(out / "view.matches.gpkg"), cands, info.crs_wkt, props)
    valid = scores
    return {"raster": raster, "heatmap": heat, "geojson": gj, "gpkg": gp, "candidates": cands,
            "crs_wkt": info.crs_wkt, "min": float(valid.min()), "max": float(valid.max()), "grid": grid}

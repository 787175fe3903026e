"""Shared fixtures for engine tests: real rasters, one real model per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.warp import Resampling, calculate_default_transform, reproject

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def embedder():
    from model_backend.nn.embedder import EmbeddingModel

    return EmbeddingModel.load(device="cpu")


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("CDIKT_CACHE_DIR", str(d))
    return d


def warp_to(src: Path, dst: Path, crs: CRS) -> Path:
    """Reproject a real raster into another CRS (geographic or custom) for CRS tests."""
    with rasterio.open(src) as s:
        transform, w, h = calculate_default_transform(s.crs, crs, s.width, s.height, *s.bounds)
        profile = {**s.profile, "crs": crs, "transform": transform, "width": w, "height": h,
                   "driver": "GTiff", "compress": "deflate"}
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
        profile["tiled"] = False
        profile.pop("photometric", None)
        with rasterio.open(dst, "w", **profile) as d:
            for b in range(1, s.count + 1):
                out = np.zeros((h, w), dtype=s.dtypes[0])
                reproject(rasterio.band(s, b), out, src_transform=s.transform, src_crs=s.crs,
                          dst_transform=transform, dst_crs=crs, resampling=Resampling.bilinear)
                d.write(out, b)
    return dst


def crop_to(src: Path, dst: Path, window) -> Path:
    """A window of a real raster as its own GeoTIFF (small, fast cases of real imagery)."""
    with rasterio.open(src) as s:
        profile = {**s.profile, "width": window.width, "height": window.height,
                   "transform": s.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
        with rasterio.open(dst, "w", **profile) as d:
            d.write(s.read(window=window))
    return dst


CUSTOM_WKT = (
    'PROJCS["Custom TM",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
    'PARAMETER["latitude_of_origin",52.0],PARAMETER["central_meridian",5.3],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",100000],PARAMETER["false_northing",200000],UNIT["metre",1]]'
)

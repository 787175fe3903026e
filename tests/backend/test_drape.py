"""The photo draped through its verified homography lands where the truth says, in the raster's CRS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS

from model_backend.learn.datasets.synth import ViewSpec, render_view
from model_backend.locate.drape import drape_photo


def test_draped_synthetic_view_matches_the_orthophoto(data_dir: Path, tmp_path: Path) -> None:
    raster = data_dir / "netherlands_aerial_0.25m_epsg28992.tif"
    with rasterio.open(raster) as ds:
        cx, cy = ds.transform * (500, 500)
        crs_wkt = ds.crs.to_wkt()
    view = render_view(str(raster), ViewSpec(cx=cx, cy=cy, footprint_m=60.0, heading_deg=35.0, tilt_deg=15.0,
                                             tilt_azimuth_deg=35.0))
    out = drape_photo(view.image, view.image_to_crs, crs_wkt, tmp_path / "d.tif")
    with rasterio.open(out) as d, rasterio.open(raster) as src:
        assert CRS.from_wkt(d.crs.to_wkt()) == CRS.from_wkt(crs_wkt)
        assert d.count == 4
        rgba = d.read()
        inside = rgba[3] > 0
        assert 0.3 < inside.mean() < 1.0  # a rotated quadrilateral inside its bounding box
        # The draped pixels agree with the orthophoto below them.
        ref = src.read([1, 2, 3], window=src.window(*d.bounds), out_shape=(3, d.height, d.width))
        a = rgba[:3][:, inside].astype(float).ravel()
        b = ref[:, inside].astype(float).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.8

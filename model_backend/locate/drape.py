"""The photo draped on the map through its verified homography, as a georeferenced GeoTIFF.

An analyst trusts a footprint more when the photo itself lies on the orthophoto and roads line
up. The verified homography maps photo pixels to the raster's CRS; the output grid is the
footprint's bounding box at the photo's own ground resolution, and every output pixel is pulled
from the photo through the inverse homography (one cv2.warpPerspective call). Pixels outside
the photo are transparent (alpha band), and the CRS is written as WKT, never as an EPSG guess.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from model_backend.core.atomic import atomic_path
from model_backend.core.errors import InputError

MAX_SIDE = 4096
"""Cap on the draped raster's side: enough for any drone photo, bounded for oblique ones."""


def drape_photo(photo: np.ndarray, image_to_crs: np.ndarray | list, crs_wkt: str, path: str | os.PathLike[str],
                gsd: float | None = None) -> str:
    """Write `photo` (H, W, 3 uint8) warped into the raster CRS as an RGBA GeoTIFF; return its path."""
    h_mat = np.asarray(image_to_crs, dtype=np.float64)
    if h_mat.shape != (3, 3) or not np.all(np.isfinite(h_mat)):
        raise InputError("The homography is not a finite 3x3 matrix; verify the photo before draping it.")
    ph, pw = photo.shape[:2]
    corners = np.array([[0, 0, 1], [pw, 0, 1], [pw, ph, 1], [0, ph, 1]], dtype=np.float64) @ h_mat.T
    xy = corners[:, :2] / corners[:, 2:3]
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    if gsd is None:  # the photo's mean resolution in CRS units
        gsd = math.sqrt(max((x1 - x0) * (y1 - y0), 1e-12) / (pw * ph))
    gsd = max(gsd, max(x1 - x0, y1 - y0) / MAX_SIDE)
    width, height = max(1, math.ceil((x1 - x0) / gsd)), max(1, math.ceil((y1 - y0) / gsd))
    out_transform = Affine(gsd, 0, x0, 0, -gsd, y1)
    # destination pixel -> CRS -> photo pixel
    dst_to_src = np.linalg.inv(h_mat) @ np.array(out_transform).reshape(3, 3)
    rgb = cv2.warpPerspective(photo, dst_to_src, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = cv2.warpPerspective(np.full((ph, pw), 255, np.uint8), dst_to_src, (width, height),
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 4, "dtype": "uint8",
               "crs": CRS.from_wkt(crs_wkt), "transform": out_transform, "compress": "deflate",
               "photometric": "RGB", "alpha": "YES"}
    target = Path(path)
    with atomic_path(target) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(np.moveaxis(rgb, -1, 0), [1, 2, 3])
        ds.write(alpha, 4)
    return str(target.resolve())

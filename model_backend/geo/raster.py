"""What the engine needs to know about a raster, captured once and checked up front.

The plugin captures the same facts on the QGIS main thread (path, CRS WKT, bands) and hands
them to a worker; the engine re-opens the file itself, so no GDAL handle crosses threads.
Ground sizes are measured geodesically at the raster's centre, which makes "metres" mean
metres on the ground in projected, geographic (EPSG:4326) and custom CRSs alike — including
Mercator, whose map metres are not ground metres away from the equator.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.io
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NodataShadowWarning, RasterioIOError

from model_backend.core.errors import InputError
from model_backend.geo.geodesy import GEOD, to_wgs84


@dataclass(frozen=True)
class RasterInfo:
    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    """Affine coefficients a, b, c, d, e, f (rasterio order)."""
    gsd_x_m: float
    """Ground metres per pixel along a row, at the raster's centre."""
    gsd_y_m: float
    """Ground metres per pixel down a column, at the raster's centre."""
    rgb_bands: tuple[int, int, int]
    """1-based band indexes used as R, G, B (a single band is repeated)."""
    has_mask: bool
    """True when the raster has nodata, an alpha band or a mask to honour."""
    fingerprint: str

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def width_m(self) -> float:
        return self.width * self.gsd_x_m

    @property
    def height_m(self) -> float:
        return self.height * self.gsd_y_m


def open_raster(path: str | os.PathLike[str]) -> RasterInfo:
    """Open and validate a raster; raise InputError with advice for anything unusable."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"Raster not found: {p}. Check the path.")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not a raster. Pick a GeoTIFF, VRT or other GDAL raster file.")
    try:
        ds = rasterio.open(p)
    except RasterioIOError:
        raise InputError(
            f"{p} is not a raster GDAL can read. Pick a GeoTIFF, VRT or other GDAL raster file."
        ) from None
    with ds:
        if ds.crs is None:
            raise InputError(
                f"{p.name} has no coordinate reference system. Assign one (QGIS: Raster > Projections > "
                "Assign Projection, or gdal_edit.py -a_srs) and try again."
            )
        if ds.transform == Affine.identity() or ds.transform.is_degenerate:
            raise InputError(f"{p.name} is not georeferenced (no geotransform). Georeference it first.")
        if ds.transform.b != 0 or ds.transform.d != 0:
            raise InputError(f"{p.name} is rotated; warp it to a north-up raster first (gdalwarp).")
        crs_wkt = ds.crs.to_wkt()
        gx, gy = ground_resolution(crs_wkt, ds.transform, ds.width, ds.height)
        rgb = _rgb_bands(ds)
        flags = ds.mask_flag_enums[0] if ds.count else [MaskFlags.all_valid]
        has_mask = MaskFlags.all_valid not in flags
        return RasterInfo(
            path=str(p.resolve()),
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtype=ds.dtypes[0],
            crs_wkt=crs_wkt,
            transform=tuple(ds.transform)[:6],  # type: ignore[arg-type]
            gsd_x_m=gx,
            gsd_y_m=gy,
            rgb_bands=rgb,
            has_mask=has_mask,
            fingerprint=_fingerprint(p, ds),
        )


def ground_resolution(crs_wkt: str, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Ground metres per pixel in x and y, measured geodesically around the raster centre."""
    to_ll = to_wgs84(crs_wkt)
    cx, cy = width / 2.0, height / 2.0
    n = max(1.0, min(width, height) / 4.0)  # a baseline long enough to be numerically stable
    pts = [transform * (cx - n / 2, cy), transform * (cx + n / 2, cy),
           transform * (cx, cy - n / 2), transform * (cx, cy + n / 2)]
    lon, lat = to_ll.transform([p[0] for p in pts], [p[1] for p in pts])
    if not np.all(np.isfinite(lon)) or not np.all(np.isfinite(lat)):
        raise InputError("The raster's CRS cannot be converted to longitude/latitude; check its CRS definition.")
    _, _, dx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = GEOD.inv(lon[2], lat[2], lon[3], lat[3])
    return float(dx / n), float(dy / n)


def _rgb_bands(ds: rasterio.io.DatasetReader) -> tuple[int, int, int]:
    """Pick the bands shown as RGB: colour interpretation first, else the first three.

    RGBN (NAIP) and RGBA rasters use bands 1-3; a single band is repeated to grey RGB, so a
    panchromatic raster embeds the same way a greyscale photo does.
    """
    interp = list(ds.colorinterp)
    if ds.count >= 3:
        try:
            return (interp.index(ColorInterp.red) + 1, interp.index(ColorInterp.green) + 1,
                    interp.index(ColorInterp.blue) + 1)
        except ValueError:
            return (1, 2, 3)
    return (1, 1, 1)


def _fingerprint(p: Path, ds: rasterio.io.DatasetReader) -> str:
    """Identify the raster's content cheaply: path, size, mtime and georeferencing.

    Hashing whole rasters would cost minutes on a large mosaic; a changed file changes its
    mtime or size, which is what matters for reusing a cached index.
    """
    st = p.stat()
    h = hashlib.sha256()
    for part in (str(p.resolve()), st.st_size, st.st_mtime_ns, ds.width, ds.height, ds.count,
                 tuple(ds.transform)[:6], ds.crs.to_wkt()):
        h.update(repr(part).encode())
    return h.hexdigest()


def dataset_mask(ds: rasterio.io.DatasetReader, **kwargs) -> np.ndarray:
    """``ds.dataset_mask(**kwargs)`` without rasterio's NodataShadowWarning.

    A raster with both an alpha band and a nodata value (Pix4D exports) makes rasterio warn on
    every read that nodata wins; the mask is what we want either way, and the warning would
    reach the analyst's terminal on each command.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NodataShadowWarning)
        return ds.dataset_mask(**kwargs)

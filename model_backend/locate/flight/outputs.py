"""A flight's own outputs: the track (a LineString through the chosen places, M = seconds) and the
per-photo table, as one GeoPackage (layers `track` and `photos`) and a CSV, each written atomically."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_backend.core.atomic import atomic_path, atomic_write_bytes
from model_backend.locate.export import gdal_exceptions, new_gpkg, ogr_field

PHOTO_FIELDS: dict[str, type] = {
    "order": int, "photo": str, "time": str, "time_s": float, "chosen_rank": int, "x": float, "y": float,
    "lon": float, "lat": float, "score": float, "track_confidence": float, "flag": str, "verified": bool,
    "independent_x": float, "independent_y": float, "independent_score": float, "step_m": float,
    "footprint_m": float, "gps_distance_m": float,
}
"""One row per photo, in flight order. chosen_rank: the rank by score of the place the track chose among
the places it considered for that photo (1 = the photo's own best; null for an outlier, which keeps
its own best as x/y); step_m: ground distance from the
previous photo on the track; flag: '' (on the track), 'outlier' (no candidate fits its neighbours),
'uncertain' (the track's choice has a posterior below one half)."""


def write_flight_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(PHOTO_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in PHOTO_FIELDS})
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
    return str(Path(path).absolute())


def write_flight_gpkg(path: str | os.PathLike[str], crs_wkt: str, rows: Sequence[dict[str, Any]],
                      track: Sequence[tuple[float, float, float]], track_props: dict[str, Any]) -> str:
    """Layers `track` (one LineStringM: x, y, M = seconds since the first photo) and `photos` (points)."""
    from osgeo import ogr

    with gdal_exceptions(), atomic_path(path) as tmp:
        ds, srs = new_gpkg(tmp, crs_wkt)
        lyr = feat = None
        try:
            lyr = ds.CreateLayer("track", srs, ogr.wkbLineStringM, options=["GEOMETRY_NAME=geom", "FID=fid"])
            for key, value in track_props.items():
                lyr.CreateField(ogr_field(key, type(value) if value is not None else str))
            feat = ogr.Feature(lyr.GetLayerDefn())
            for key, value in track_props.items():
                if value is None:
                    feat.SetFieldNull(key)
                else:
                    feat.SetField(key, value)
            if len(track) >= 2:
                line = ogr.Geometry(ogr.wkbLineStringM)
                for x, y, m in track:
                    line.AddPointM(float(x), float(y), float(m))
                feat.SetGeometry(line)
            lyr.CreateFeature(feat)
            lyr = feat = None
            lyr = ds.CreateLayer("photos", srs, ogr.wkbPoint, options=["GEOMETRY_NAME=geom", "FID=fid"])
            for key, kind in PHOTO_FIELDS.items():
                lyr.CreateField(ogr_field(key, kind))
            lyr.StartTransaction()
            for r in rows:
                feat = ogr.Feature(lyr.GetLayerDefn())
                for key in PHOTO_FIELDS:
                    value = r.get(key)
                    if value is None:
                        feat.SetFieldNull(key)
                    else:
                        feat.SetField(key, value)
                pt = ogr.Geometry(ogr.wkbPoint)
                pt.AddPoint_2D(float(r["x"]), float(r["y"]))
                feat.SetGeometry(pt)
                lyr.CreateFeature(feat)
            lyr.CommitTransaction()
        finally:
            lyr = feat = None
            ds = None
    return str(Path(path).absolute())

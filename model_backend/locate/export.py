"""Writing results: GeoJSON for reports and other tools, GeoPackage for GIS work, atomically.

GeoJSON follows RFC 7946 strictly because its readers assume it: WGS84 lon/lat only (no "crs"
member), counter-clockwise exterior rings, and polygons that cross the antimeridian split in
two. Every edge is densified before reprojection so a footprint stays the shape it was on the
raster. The GeoPackage keeps the raster's own CRS, taken from its WKT so custom CRSs survive.
Every file is written under a temporary name in the target folder and renamed into place, so
a reader (or QGIS reloading a layer) never sees half a file, and a failure leaves nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyproj import CRS, Transformer

from model_backend.core.atomic import atomic_path
from model_backend.core.errors import InputError
from model_backend.geo.geodesy import to_wgs84

if TYPE_CHECKING:  # imported for types only: candidates imports heatmap, which imports this module
    from model_backend.locate.candidates import Candidate

DENSIFY = 8
"""Segments per footprint edge in GeoJSON (7 extra points): enough to follow any curvature a
reprojection can add to a footprint of a few hundred metres, small enough to keep files light."""
DECIMALS = 7
"""~1 cm on the ground: below any raster's pixel, and what RFC 7946 suggests is plenty."""

Ring = Sequence[Sequence[float]]
MATCH_FIELDS: dict[str, type] = {
    "rank": int, "score": float, "photo": str, "source_crs": str, "x": float, "y": float, "lon": float,
    "lat": float, "footprint_m": float, "footprint_source": str,
    "footprint_given_m": float, "model": str, "verified": bool,
    "confidence": float, "inliers": int, "heading_deg": float, "gsd_m": float, "tile_x": float, "tile_y": float,
    "structure": float,
    "gps_distance_m": float, "gps_disagrees": bool,
}
"""The one schema of a matches output: GeoJSON, GeoPackage and the Processing layer all carry these
properties, in this order and of these types; null where unknown (verification did not run, the
photo has no GPS). A caller's extra properties follow them."""


# ---------------------------------------------------------------- geometry helpers

def ring_signed_area(ring: Ring) -> float:
    """Shoelace area: positive for a counter-clockwise ring in x-east / y-north axes."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0, *_), (x1, y1, *_) in zip(ring, ring[1:]))


def polygon_is_ccw(ring: Ring) -> bool:
    """True when the (closed) ring winds counter-clockwise, as RFC 7946 wants exterior rings."""
    return ring_signed_area(ring) > 0


def ring_is_closed(ring: Ring) -> bool:
    return len(ring) >= 4 and tuple(ring[0]) == tuple(ring[-1])


def densify_ring(ring: Ring, segments: int = DENSIFY) -> list[tuple[float, float]]:
    """Split every edge of a closed ring into `segments` equal parts (the ring stays closed)."""
    out: list[tuple[float, float]] = []
    for (x0, y0, *_), (x1, y1, *_) in zip(ring, ring[1:]):
        out.extend((x0 + (x1 - x0) * i / segments, y0 + (y1 - y0) * i / segments) for i in range(segments))
    out.append(out[0])
    return out


def source_crs_label(crs_wkt: str) -> str:
    """'AUTH:CODE' when the raster CRS carries (or exactly matches) an authority code, else its WKT.

    Only an exact match (confidence 100) earns a code: a "close" EPSG code for a custom CRS
    would send the reader's coordinates somewhere else.
    """
    crs = CRS.from_wkt(crs_wkt)
    auth = crs.to_authority(min_confidence=100)
    return f"{auth[0]}:{auth[1]}" if auth else crs_wkt.strip()


def _wgs84_geometry(ring: Ring, transformer: Transformer) -> dict[str, Any]:
    """Densified, reprojected, CCW, rounded GeoJSON geometry; split in two at the antimeridian."""
    dense = densify_ring(ring)
    lons, lats = transformer.transform([p[0] for p in dense], [p[1] for p in dense])
    pts = [(float(lo), float(la)) for lo, la in zip(lons, lats)]
    if not all(math.isfinite(v) for p in pts for v in p):
        raise InputError("A footprint cannot be converted to longitude/latitude; check the raster's CRS.")
    parts = [pts]
    if max(p[0] for p in pts) - min(p[0] for p in pts) > 180:
        parts = _split_antimeridian(pts)
    rings = []
    for part in parts:
        r = [(round(x, DECIMALS), round(y, DECIMALS)) for x, y in part]
        r[-1] = r[0]
        if not polygon_is_ccw(r):
            r.reverse()
        rings.append([list(p) for p in r])
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": [rings[0]]}
    return {"type": "MultiPolygon", "coordinates": [[r] for r in rings]}


def _split_antimeridian(pts: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Cut a ring that wraps past ±180° into an eastern and a western part (RFC 7946 §3.1.9)."""
    from shapely.geometry import Polygon, box  # shapely 1.8 or 2; only needed near the antimeridian

    shifted = Polygon([(x + 360 if x < 0 else x, y) for x, y in pts])
    east = shifted.intersection(box(0, -90, 180, 90))
    west = shifted.intersection(box(180, -90, 540, 90))
    parts = []
    for geom, dx in ((east, 0.0), (west, -360.0)):
        for poly in getattr(geom, "geoms", [geom]):
            if poly.geom_type == "Polygon" and not poly.is_empty and poly.area > 0:
                parts.append([(x + dx, y) for x, y in poly.exterior.coords])
    return parts


# ---------------------------------------------------------------- properties

def match_properties(c: Candidate, crs_label: str, extra: dict | None) -> dict[str, Any]:
    """The MATCH_FIELDS of one candidate (the result-level ones from `extra`), then extra's other keys."""
    props: dict[str, Any] = dict.fromkeys(MATCH_FIELDS)
    props["source_crs"] = crs_label
    for key, value in (extra or {}).items():
        props[key] = _plain(value)
    props.update(c.to_properties())  # the candidate's own fields win over anything passed in
    return props


def _plain(value: Any) -> Any:
    """numpy scalars and paths as plain JSON values (json.dump refuses them)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------------------------------------------------------------- GeoJSON

def write_geojson(path: str | os.PathLike[str], candidates: Sequence[Candidate], crs_wkt: str,
                  properties: dict | None = None) -> str:
    """Write the candidates as an RFC 7946 FeatureCollection in WGS84; return the absolute path."""
    transformer = to_wgs84(crs_wkt)
    label = source_crs_label(crs_wkt)
    features = [
        {"type": "Feature", "id": int(c.rank), "properties": match_properties(c, label, properties),
         "geometry": _wgs84_geometry(c.polygon, transformer)}
        for c in candidates
    ]
    doc = {"type": "FeatureCollection", "features": features}
    text = json.dumps(doc, allow_nan=False, ensure_ascii=False, default=_json_default)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")
    return str(Path(path).absolute())


def _json_default(value: Any) -> Any:
    plain = _plain(value)
    if plain is value:
        return str(value)  # anything else exotic: keep it readable rather than fail the export
    return plain


def geojson_problems(doc: dict) -> list[str]:
    """RFC 7946 rules our files must meet, as a list of violations (empty = valid)."""
    problems = []
    if doc.get("type") != "FeatureCollection":
        problems.append("top-level type is not FeatureCollection")
    if "crs" in doc:
        problems.append("has a 'crs' member (RFC 7946 removed it)")
    for i, feat in enumerate(doc.get("features", [])):
        geom = feat.get("geometry") or {}
        if feat.get("type") != "Feature" or "properties" not in feat:
            problems.append(f"feature {i}: not a Feature with properties")
        coords = geom.get("coordinates")
        polys = {"Polygon": [coords], "MultiPolygon": coords}.get(geom.get("type"))
        if polys is None:
            problems.append(f"feature {i}: geometry is {geom.get('type')}, not a polygon")
            continue
        for poly in polys:
            for j, ring in enumerate(poly):
                if not ring_is_closed(ring):
                    problems.append(f"feature {i}: ring {j} is not closed")
                if any(not (-180 <= x <= 180 and -90 <= y <= 90) for x, y, *_ in ring):
                    problems.append(f"feature {i}: ring {j} has a position outside lon/lat bounds")
                if (j == 0) != polygon_is_ccw(ring):
                    problems.append(f"feature {i}: ring {j} winds the wrong way")
    return problems


# ---------------------------------------------------------------- GeoPackage

@contextmanager
def gdal_exceptions() -> Iterator[None]:
    """Turn OGR/OSR errors into exceptions for this block only; QGIS shares these module flags."""
    from osgeo import ogr, osr

    prev = (ogr.GetUseExceptions(), osr.GetUseExceptions())
    ogr.UseExceptions()
    osr.UseExceptions()
    try:
        yield
    finally:
        if not prev[1]:  # GDAL keeps a stack of error handlers: undo in reverse order
            osr.DontUseExceptions()
        if not prev[0]:
            ogr.DontUseExceptions()


def ogr_field(name: str, kind: type) -> Any:
    """A typed field: integers, reals, booleans stay what they are; anything else is text."""
    from osgeo import ogr

    if kind is bool:
        fd = ogr.FieldDefn(name, ogr.OFTInteger)
        fd.SetSubType(ogr.OFSTBoolean)
        return fd
    if kind is int:
        return ogr.FieldDefn(name, ogr.OFTInteger if name == "rank" else ogr.OFTInteger64)
    if kind is float:
        return ogr.FieldDefn(name, ogr.OFTReal)
    return ogr.FieldDefn(name, ogr.OFTString)


def ogr_polygon(ring: Ring) -> Any:
    """An OGR polygon from one exterior ring of (x, y[, ...]) points, for the GeoPackage writers."""
    from osgeo import ogr

    lr = ogr.Geometry(ogr.wkbLinearRing)
    for x, y, *_ in ring:
        lr.AddPoint_2D(float(x), float(y))
    poly = ogr.Geometry(ogr.wkbPolygon)
    poly.AddGeometry(lr)
    return poly


def write_gpkg(path: str | os.PathLike[str], candidates: Sequence[Candidate], crs_wkt: str,
               properties: dict | None = None, layer: str = "matches") -> str:
    """Write the candidates as a polygon layer in the raster's CRS (from its WKT); return the path."""
    label = source_crs_label(crs_wkt)
    rows = [match_properties(c, label, properties) for c in candidates]
    # Field types: the schema's, then (for a caller's extra properties) the first non-null value's.
    keys = list(rows[0]) if rows else [*MATCH_FIELDS, *(k for k in (properties or {}) if k not in MATCH_FIELDS)]
    fields = {k: MATCH_FIELDS[k] if k in MATCH_FIELDS else
              type(next((r[k] for r in rows if r.get(k) is not None), "")) for k in keys}
    return write_polygon_gpkg(path, crs_wkt, layer, fields, [(c.polygon, r) for c, r in zip(candidates, rows)])


def new_gpkg(path: str, crs_wkt: str) -> tuple[Any, Any]:
    """A new, empty GeoPackage and the raster's CRS for its layers (x = easting, whatever the CRS's axis order)."""
    from osgeo import ogr, osr

    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return ogr.GetDriverByName("GPKG").CreateDataSource(path), srs


def write_polygon_gpkg(path: str | os.PathLike[str], crs_wkt: str, layer: str, fields: dict[str, type],
                       features: Sequence[tuple[Ring, dict[str, Any]]]) -> str:
    """One polygon layer in a new GeoPackage, atomically: fields typed from Python types (bool, int,
    float, str; anything else stored as JSON text), one feature per (ring, properties)."""
    from osgeo import ogr

    names = {k: (f"{k}_" if k.lower() in ("fid", "geom") else k) for k in fields}
    with gdal_exceptions(), atomic_path(path) as tmp:
        ds, srs = new_gpkg(tmp, crs_wkt)
        lyr = feat = None
        try:
            lyr = ds.CreateLayer(layer, srs, ogr.wkbPolygon, options=["GEOMETRY_NAME=geom", "FID=fid"])
            for key, kind in fields.items():
                lyr.CreateField(ogr_field(names[key], kind))
            lyr.StartTransaction()
            for ring, props in features:
                feat = ogr.Feature(lyr.GetLayerDefn())
                for key, value in props.items():
                    if value is None:
                        feat.SetFieldNull(names[key])
                    elif isinstance(value, (bool, int, float, str)):
                        feat.SetField(names[key], value)
                    else:
                        feat.SetField(names[key], json.dumps(value, default=_json_default))
                feat.SetGeometry(ogr_polygon(ring))
                lyr.CreateFeature(feat)
            lyr.CommitTransaction()
        finally:
            lyr = feat = None  # a layer or feature alive keeps the dataset open
            ds = None  # closing flushes and releases the SQLite file before the rename
    return str(Path(path).absolute())


# ---------------------------------------------------------------- reading back

def read_matches(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Features of a matches GeoJSON or GeoPackage as [{type, properties, coordinates}], by rank."""
    p = Path(path)
    if p.suffix.lower() in (".geojson", ".json"):
        doc = json.loads(p.read_text(encoding="utf-8"))
        out = [{"type": f["geometry"]["type"], "properties": f["properties"],
                "coordinates": f["geometry"]["coordinates"]} for f in doc["features"]]
    else:
        from osgeo import ogr

        with gdal_exceptions():
            ds = ogr.Open(str(p))
            lyr = ds.GetLayer(0)
            out = []
            for feat in lyr:
                geom = json.loads(feat.GetGeometryRef().ExportToJson())
                out.append({"type": geom["type"], "properties": feat.items(),
                            "coordinates": geom["coordinates"]})
            ds = None
    return sorted(out, key=lambda f: f["properties"].get("rank") or 0)

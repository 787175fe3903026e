"""Labelled pairs: which drone photo was taken where, in a file any GIS (and any script) can open.

A label is one photo and its footprint on the ground: a square of the photo's ground size (its
short side), turned so its top edge faces the photo's heading. The analyst draws them in QGIS
(cdikt_qgis.labelling), the `adapt` command and task read them back; both go through this
module so the schema cannot drift between the dialog, the CLI and hand-made files.

Schema (one feature per pair):
- geometry: the footprint polygon. GeoPackage: any CRS (the dialog uses the raster's), read from
  the layer's WKT so custom CRSs survive. GeoJSON: WGS84 lon/lat per RFC 7946 (no `crs` member,
  counter-clockwise exterior ring).
- `photo`: the photo's path, absolute or relative to the labels file's folder (a folder moved
  with its labels keeps working).
- `photo_sha256`: the photo's content hash when labelled, so a relinked or re-exported photo is noticed.
- `heading`: degrees clockwise from north that the photo's top edge faces; null = unknown.
- `created`, `edited`: ISO 8601 UTC times.

Writes are atomic (temporary file, then rename): a failure never leaves a half-written or
emptied labels file. Reading validates and explains, one line per problem, what to fix.
No torch here: the plugin imports this module on the main thread.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyproj import CRS, Transformer

from model_backend.core.atomic import atomic_path
from model_backend.core.checksums import sha256_file
from model_backend.core.errors import InputError
from model_backend.geo.geodesy import metres_per_unit
from model_backend.locate.export import gdal_exceptions, polygon_is_ccw, ring_signed_area, write_polygon_gpkg

LAYER = "labels"
FIELDS = ("photo", "photo_sha256", "heading", "created", "edited")
WGS84_WKT = CRS.from_epsg(4326).to_wkt()
GEOJSON_SUFFIXES = (".geojson", ".json")

Ring = list[tuple[float, float]]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Label:
    """One photo and where it was taken; `ring` is closed, counter-clockwise, in the set's CRS."""

    photo: str
    ring: Ring
    heading: float | None = None
    photo_sha256: str = ""
    created: str = field(default_factory=now_iso)
    edited: str = field(default_factory=now_iso)

    def properties(self) -> dict[str, Any]:
        return {"photo": self.photo, "photo_sha256": self.photo_sha256,
                "heading": None if self.heading is None else round(float(self.heading) % 360.0, 4),
                "created": self.created, "edited": self.edited}


@dataclass
class LabelSet:
    """Labels in one CRS, and the file they belong to (relative photo paths resolve against its folder)."""

    labels: list[Label]
    crs_wkt: str
    path: str | None = None

    def photo_path(self, label: Label) -> Path:
        p = Path(label.photo).expanduser()
        if not p.is_absolute() and self.path:
            p = Path(self.path).absolute().parent / p
        return p

    def to_crs(self, crs_wkt: str) -> LabelSet:
        """The same labels with rings reprojected (photo paths and times unchanged)."""
        if CRS.from_wkt(crs_wkt) == CRS.from_wkt(self.crs_wkt):
            return replace(self, labels=list(self.labels), crs_wkt=crs_wkt)
        tr = Transformer.from_crs(CRS.from_wkt(self.crs_wkt), CRS.from_wkt(crs_wkt), always_xy=True)
        return replace(self, crs_wkt=crs_wkt, labels=[replace(lb, ring=_reproject(lb.ring, tr)) for lb in self.labels])

    def stored_photo(self, photo: str | Path) -> str:
        """How a photo path is stored: relative when it lies under the labels file's folder, else absolute."""
        p = Path(photo).expanduser().absolute()
        if self.path:
            base = Path(self.path).absolute().parent
            try:
                return p.relative_to(base).as_posix()
            except ValueError:
                pass
        return str(p)


# ---------------------------------------------------------------- footprint geometry

def square_footprint(cx: float, cy: float, side_m: float, heading_deg: float | None, crs_wkt: str) -> Ring:
    """Closed CCW ring of a square of `side_m` ground metres centred on (cx, cy), top edge facing the heading.

    Corners are computed in ground metres and scaled per axis, so the square is square on the
    ground in degree and Mercator CRSs too. Ring order: top-left, bottom-left, bottom-right,
    top-right (of the photo), back to top-left.
    """
    if not side_m > 0:
        raise InputError(f"A footprint must have a positive size, got {side_m} m.")
    mx, my = metres_per_unit(crs_wkt, cx, cy)
    h = math.radians(heading_deg or 0.0)
    up = (math.sin(h), math.cos(h))
    right = (math.cos(h), -math.sin(h))
    r = side_m / 2.0
    corners = [(-1, 1), (-1, -1), (1, -1), (1, 1)]  # (right, up) multiples: TL, BL, BR, TR
    ring = [(cx + r * (a * right[0] + b * up[0]) / mx, cy + r * (a * right[1] + b * up[1]) / my) for a, b in corners]
    ring.append(ring[0])
    if ring_signed_area(ring) < 0:  # CRSs with a flipped axis
        ring.reverse()
    return ring


def ring_centre(ring: Ring) -> tuple[float, float]:
    """Centre of a footprint: the vertices' mean (the ring's closing point counted once)."""
    pts = ring[:-1] if len(ring) > 1 and tuple(ring[0]) == tuple(ring[-1]) else ring
    return (sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts))


def ring_side_m(ring: Ring, crs_wkt: str) -> float:
    """Side of the ground square with the footprint's area: the photo's ground size, whatever the CRS."""
    cx, cy = ring_centre(ring)
    mx, my = metres_per_unit(crs_wkt, cx, cy)
    return math.sqrt(abs(ring_signed_area(ring)) * mx * my)


def _reproject(ring: Ring, tr: Transformer) -> Ring:
    xs, ys = tr.transform([p[0] for p in ring], [p[1] for p in ring])
    out = [(float(x), float(y)) for x, y in zip(xs, ys)]
    if not all(math.isfinite(v) for p in out for v in p):
        raise InputError("A label's footprint cannot be converted between coordinate systems; check the CRSs.")
    if ring_signed_area(out) < 0:
        out.reverse()
    return out


# ---------------------------------------------------------------- reading

def read_labels(path: str | Path) -> LabelSet:
    """Read a labels GeoPackage (any CRS) or GeoJSON (WGS84); InputError with what to fix otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Labels file not found: {p}. Check the path.")
    if p.suffix.lower() in GEOJSON_SUFFIXES:
        return _read_geojson(p)
    if p.suffix.lower() == ".gpkg":
        return _read_gpkg(p)
    raise InputError(f"{p.name}: labels must be a .gpkg or .geojson file.")


def _label_from(props: dict[str, Any], ring: Ring, where: str) -> Label:
    photo = props.get("photo")
    if not isinstance(photo, str) or not photo.strip():
        raise InputError(f"{where} has no 'photo' property; every label needs the path of its photo.")
    heading = props.get("heading")
    try:
        heading = None if heading is None or heading == "" else float(heading)
    except (TypeError, ValueError):
        raise InputError(f"{where}: heading {heading!r} is not a number of degrees.") from None
    if heading is not None and not math.isfinite(heading):
        heading = None
    if len(ring) < 4:
        raise InputError(f"{where}: the footprint has fewer than 3 corners; redraw it.")
    if tuple(ring[0]) != tuple(ring[-1]):
        ring = [*ring, ring[0]]
    if not polygon_is_ccw(ring):
        ring = list(reversed(ring))
    return Label(photo=photo.strip(), ring=ring, heading=heading,
                 photo_sha256=str(props.get("photo_sha256") or ""),
                 created=str(props.get("created") or ""), edited=str(props.get("edited") or ""))


def _read_geojson(p: Path) -> LabelSet:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p.name} is not readable GeoJSON ({type(exc).__name__}); check the file.") from None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise InputError(f"{p.name} is not a GeoJSON FeatureCollection.")
    features = doc.get("features")
    if features is None:
        features = []
    if not isinstance(features, list):
        raise InputError(f"{p.name}: 'features' is not a list of labelled footprints; check the file.")
    labels = []
    for i, feat in enumerate(features):
        where = f"{p.name} feature {i + 1}"
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        if not isinstance(geom, dict) or geom.get("type") != "Polygon" or not geom.get("coordinates"):
            raise InputError(f"{where} is not a polygon; each label's geometry is its footprint polygon.")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise InputError(f"{where}: its properties are not a set of named values; check the file.")
        labels.append(_label_from(props, _ring(geom["coordinates"], where), where))
    return LabelSet(labels, WGS84_WKT, str(p.absolute()))


def _ring(coordinates: Any, where: str) -> Ring:
    """The outer ring of GeoJSON polygon coordinates as (x, y) floats, or one line saying what is wrong."""
    try:
        ring = [(float(c[0]), float(c[1])) for c in coordinates[0]]
    except (TypeError, ValueError, IndexError, KeyError):
        raise InputError(f"{where}: the footprint's corners are not pairs of numbers; redraw it.") from None
    if not all(math.isfinite(v) for xy in ring for v in xy):
        raise InputError(f"{where}: the footprint has a corner that is not a finite number; redraw it.")
    return ring


def _read_gpkg(p: Path) -> LabelSet:
    from osgeo import ogr

    try:
        with gdal_exceptions():
            ds = ogr.Open(str(p))
            if ds is None:
                raise InputError(f"{p.name} is not a readable GeoPackage; choose the labels file.")
            lyr = ds.GetLayerByName(LAYER) or ds.GetLayer(0)
            if lyr is None:
                raise InputError(f"{p.name} holds no layer; it is not a labels file.")
            srs = lyr.GetSpatialRef()
            if srs is None:
                raise InputError(f"{p.name} has no CRS; save the labels layer with a CRS.")
            crs_wkt = srs.ExportToWkt()
            labels = []
            for i, feat in enumerate(lyr):
                geom = feat.GetGeometryRef()
                where = f"{p.name} feature {i + 1}"
                if geom is None or ogr.GT_Flatten(geom.GetGeometryType()) != ogr.wkbPolygon:
                    raise InputError(f"{where} is not a polygon; each label's geometry is its footprint polygon.")
                ext = geom.GetGeometryRef(0)
                ring = [(ext.GetX(j), ext.GetY(j)) for j in range(ext.GetPointCount())]
                labels.append(_label_from(feat.items(), ring, where))
            ds = lyr = None
    except RuntimeError as exc:  # OGR: not a GeoPackage, locked, corrupt
        raise InputError(f"{p.name} is not a readable GeoPackage ({str(exc).strip()[:120]}).") from None
    return LabelSet(labels, crs_wkt, str(p.absolute()))


# ---------------------------------------------------------------- writing

def write_labels(path: str | Path, labels: LabelSet) -> str:
    """Write atomically: .geojson in WGS84 (RFC 7946), .gpkg in the set's CRS. Returns the absolute path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in GEOJSON_SUFFIXES:
        return _write_geojson(p, labels)
    if p.suffix.lower() == ".gpkg":
        return _write_gpkg(p, labels)
    raise InputError(f"{p.name}: labels are saved as .gpkg or .geojson.")


def _write_geojson(p: Path, labels: LabelSet) -> str:
    wgs = labels.to_crs(WGS84_WKT)
    feats = []
    for i, lb in enumerate(wgs.labels):
        ring = [[round(x, 8), round(y, 8)] for x, y in lb.ring]
        ring[-1] = ring[0]
        if not polygon_is_ccw(ring):
            ring.reverse()
        feats.append({"type": "Feature", "id": i + 1, "properties": lb.properties(),
                      "geometry": {"type": "Polygon", "coordinates": [ring]}})
    text = json.dumps({"type": "FeatureCollection", "features": feats}, allow_nan=False, ensure_ascii=False)
    with atomic_path(p) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return str(p.absolute())


def _write_gpkg(p: Path, labels: LabelSet) -> str:
    fields = {name: float if name == "heading" else str for name in FIELDS}
    return write_polygon_gpkg(p, labels.crs_wkt, LAYER, fields, [(lb.ring, lb.properties()) for lb in labels.labels])


# ---------------------------------------------------------------- checking against a raster

@dataclass(frozen=True)
class ResolvedLabel:
    """A label ready for training or validation: the photo's real path and the footprint in the raster's CRS."""

    index: int
    """1-based position in the labels file, for messages."""
    photo: Path
    cx: float
    cy: float
    side_m: float
    heading: float | None
    ring: Ring


def resolve_labels(labels: LabelSet, raster_crs_wkt: str,
                   bounds: tuple[float, float, float, float], raster_name: str = "the raster",
                   check_photos: bool = True) -> list[ResolvedLabel]:
    """Every label in the raster's CRS with its photo found and readable; InputError on the first problem.

    Zero labels, a footprint leaving the raster (`bounds` = xmin, ymin, xmax, ymax) and a photo
    that is missing or not an image each give one line naming the label and what to do. Nothing
    is written: the labels file stays as it is whatever goes wrong.
    """
    where = Path(labels.path).name if labels.path else "The labels"
    if not labels.labels:
        raise InputError(f"{where} holds no labelled pairs; label a few photos on the map (Label pairs…) first.")
    in_raster = labels.to_crs(raster_crs_wkt)
    xmin, ymin, xmax, ymax = bounds
    out = []
    for i, (orig, lb) in enumerate(zip(labels.labels, in_raster.labels), start=1):
        name = Path(orig.photo).name
        xs, ys = [p[0] for p in lb.ring], [p[1] for p in lb.ring]
        if min(xs) < xmin or max(xs) > xmax or min(ys) < ymin or max(ys) > ymax:
            raise InputError(f"Label {i} ({name}) lies outside {raster_name}; move it onto the raster or delete it.")
        photo = labels.photo_path(orig)
        if check_photos:
            check_photo_readable(photo, f"Label {i}")
            if orig.photo_sha256 and sha256_file(photo) != orig.photo_sha256:  # training on wrong pairs "improves"
                raise InputError(f"Label {i}: {name} is not the photo that was labelled (its content changed); "
                                 "relink the right photo, or label this one again.")
        cx, cy = ring_centre(lb.ring)
        out.append(ResolvedLabel(i, photo, cx, cy, ring_side_m(lb.ring, raster_crs_wkt), lb.heading, lb.ring))
    return out


def check_photo_readable(photo: Path, what: str) -> None:
    """The photo exists and its header decodes as an image (cheap; full decoding errors come later, per photo)."""
    from PIL import Image, UnidentifiedImageError

    if not photo.is_file():
        raise InputError(f"{what}: photo {photo.name} not found at {photo}; relink the photo or delete the label.")
    try:
        with Image.open(photo) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InputError(f"{what}: photo {photo.name} cannot be read as an image; replace it or delete the label.") \
            from None

"""Labels file schema: footprints, GeoPackage in any CRS, RFC 7946 GeoJSON, validation that loses nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pyproj import CRS, Transformer

from model_backend.core.checksums import sha256_file
from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.learn.labels import (
    Label,
    LabelSet,
    read_labels,
    resolve_labels,
    ring_centre,
    ring_side_m,
    square_footprint,
    write_labels,
)
from model_backend.locate.export import geojson_problems, polygon_is_ccw

from .conftest import CUSTOM_WKT

RASTER = "naip_northdakota_5m_2015.tif"


def _bounds(info) -> tuple[float, float, float, float]:
    a = info.affine
    xs, ys = (a.c, a.c + a.a * info.width), (a.f, a.f + a.e * info.height)
    return min(xs), min(ys), max(xs), max(ys)


@pytest.fixture()
def photo(tmp_path: Path, data_dir: Path) -> Path:
    from PIL import Image

    p = tmp_path / "photos" / "p1.jpg"
    p.parent.mkdir()
    Image.new("RGB", (64, 48), "green").save(p)
    return p


def _set(info, photo: Path, path: Path, n: int = 2) -> LabelSet:
    (x0, y0, x1, y1) = _bounds(info)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    labels = [Label(photo=str(photo), heading=30.0 * i, photo_sha256=sha256_file(photo),
                    ring=square_footprint(cx + 500 * i, cy, 300.0, 30.0 * i, info.crs_wkt)) for i in range(n)]
    return LabelSet(labels, info.crs_wkt, str(path))


def test_square_footprint_is_a_ground_square_facing_the_heading(data_dir: Path) -> None:
    info = open_raster(data_dir / RASTER)
    ring = square_footprint(490000.0, 5207000.0, 200.0, 0.0, info.crs_wkt)
    assert len(ring) == 5 and ring[0] == ring[-1] and polygon_is_ccw(ring)
    assert ring_side_m(ring, info.crs_wkt) == pytest.approx(200.0, rel=1e-3)
    assert ring_centre(ring) == pytest.approx((490000.0, 5207000.0))
    top_left, top_right = ring[0], ring[3]  # heading 0: the photo's top edge is the northern one
    assert top_left[1] == pytest.approx(5207100.0, abs=0.5) and top_right[1] == pytest.approx(5207100.0, abs=0.5)
    east = square_footprint(490000.0, 5207000.0, 200.0, 90.0, info.crs_wkt)
    assert east[0][0] == pytest.approx(490100.0, abs=0.5) and east[3][0] == pytest.approx(490100.0, abs=0.5)
    # In degrees the square stays square on the ground (a rectangle in lon/lat).
    wgs = CRS.from_epsg(4326).to_wkt()
    deg = square_footprint(-98.0, 47.0, 200.0, 0.0, wgs)
    assert ring_side_m(deg, wgs) == pytest.approx(200.0, rel=1e-3)
    assert (deg[2][0] - deg[0][0]) > (deg[0][1] - deg[1][1])  # a degree of longitude is shorter at 47°N


def test_gpkg_round_trip_keeps_crs_fields_and_relative_photos(data_dir: Path, tmp_path: Path, photo: Path) -> None:
    info = open_raster(data_dir / RASTER)
    path = tmp_path / "labels.gpkg"
    ls = _set(info, photo, path)
    ls.labels[1].photo = ls.stored_photo(photo)  # under the labels folder: stored relative
    ls.labels[1].heading = None
    assert ls.labels[1].photo == "photos/p1.jpg"
    write_labels(path, ls)
    back = read_labels(path)
    assert CRS.from_wkt(back.crs_wkt) == CRS.from_wkt(info.crs_wkt)
    assert [lb.heading for lb in back.labels] == [0.0, None]
    assert back.labels[0].photo_sha256 == ls.labels[0].photo_sha256 and back.labels[0].created == ls.labels[0].created
    assert back.photo_path(back.labels[1]) == photo
    assert [v for pt in back.labels[0].ring for v in pt] == pytest.approx([v for pt in ls.labels[0].ring for v in pt])


def test_gpkg_in_a_custom_crs_and_geojson_in_wgs84_are_valid(data_dir: Path, tmp_path: Path, photo: Path) -> None:
    info = open_raster(data_dir / RASTER)
    ls = _set(info, photo, tmp_path / "a.gpkg").to_crs(CUSTOM_WKT)
    write_labels(tmp_path / "custom.gpkg", ls)
    back = read_labels(tmp_path / "custom.gpkg")
    assert CRS.from_wkt(back.crs_wkt) == CRS.from_wkt(CUSTOM_WKT)
    geo = write_labels(tmp_path / "labels.geojson", back)
    doc = json.loads(Path(geo).read_text())
    assert geojson_problems(doc) == [] and "crs" not in doc
    assert set(doc["features"][0]["properties"]) == {"photo", "photo_sha256", "heading", "created", "edited"}
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert -100 < lon < -98 and 46 < lat < 48
    # Back in the raster's CRS, the footprint is where it was (to a centimetre).
    again = read_labels(geo).to_crs(info.crs_wkt)
    c0, c1 = ring_centre(again.labels[0].ring), ring_centre(_set(info, photo, tmp_path / "x.gpkg").labels[0].ring)
    assert math.dist(c0, c1) < 0.05


def test_resolve_refuses_zero_labels_outside_and_unreadable_photos(data_dir: Path, tmp_path: Path,
                                                                   photo: Path) -> None:
    info = open_raster(data_dir / RASTER)
    bounds = _bounds(info)
    empty = LabelSet([], info.crs_wkt, str(tmp_path / "empty.gpkg"))
    with pytest.raises(InputError, match="no labelled pairs"):
        resolve_labels(empty, info.crs_wkt, bounds)
    ls = _set(info, photo, tmp_path / "l.gpkg")
    ok = resolve_labels(ls, info.crs_wkt, bounds, RASTER)
    assert [r.index for r in ok] == [1, 2] and ok[0].side_m == pytest.approx(300.0, rel=1e-3)
    far = Label(photo=str(photo), ring=square_footprint(bounds[2] + 100, bounds[3], 300.0, 0.0, info.crs_wkt))
    with pytest.raises(InputError, match=r"Label 3 \(p1.jpg\) lies outside naip"):
        resolve_labels(LabelSet([*ls.labels, far], info.crs_wkt), info.crs_wkt, bounds, RASTER)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    bad = Label(photo=str(broken), ring=ls.labels[0].ring)
    with pytest.raises(InputError, match="Label 1: photo broken.jpg cannot be read"):
        resolve_labels(LabelSet([bad], info.crs_wkt), info.crs_wkt, bounds)
    gone = Label(photo=str(tmp_path / "gone.jpg"), ring=ls.labels[0].ring)
    with pytest.raises(InputError, match="gone.jpg not found"):
        resolve_labels(LabelSet([gone], info.crs_wkt), info.crs_wkt, bounds)


def test_a_failed_write_or_a_bad_file_loses_nothing(data_dir: Path, tmp_path: Path, photo: Path) -> None:
    info = open_raster(data_dir / RASTER)
    path = tmp_path / "labels.geojson"
    ls = _set(info, photo, path)
    write_labels(path, ls)
    before = path.read_bytes()
    broken = LabelSet([Label(photo=str(photo), ring=[(math.nan, 0.0), (1.0, 0.0), (1.0, 1.0), (math.nan, 0.0)])],
                      info.crs_wkt, str(path))
    with pytest.raises((InputError, ValueError)):
        write_labels(path, broken)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    not_labels = tmp_path / "notes.geojson"
    not_labels.write_text('{"type": "Feature"}')
    with pytest.raises(InputError, match="not a GeoJSON FeatureCollection"):
        read_labels(not_labels)
    assert not_labels.read_text() == '{"type": "Feature"}'
    no_photo = tmp_path / "nophoto.geojson"
    doc = json.loads(before)
    del doc["features"][1]["properties"]["photo"]
    no_photo.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="feature 2 has no 'photo' property"):
        read_labels(no_photo)


def test_wgs84_transform_used_for_geojson_is_lon_lat(data_dir: Path, tmp_path: Path, photo: Path) -> None:
    info = open_raster(data_dir / RASTER)
    ls = _set(info, photo, tmp_path / "l.gpkg", n=1)
    doc = json.loads(Path(write_labels(tmp_path / "l.geojson", ls)).read_text())
    to_ll = Transformer.from_crs(CRS.from_wkt(info.crs_wkt), CRS.from_epsg(4326), always_xy=True)
    lon, lat = to_ll.transform(*ls.labels[0].ring[0])
    assert doc["features"][0]["geometry"]["coordinates"][0][0] == pytest.approx([lon, lat], abs=1e-7)

"""Candidates (NMS), GeoJSON (RFC 7946) and GeoPackage export on real rasters in several CRSs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from osgeo import ogr, osr
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RioCRS
from shapely.geometry import Polygon, shape

from model_backend.core.config import TilingConfig
from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import TileGrid, make_grid
from model_backend.locate import export
from model_backend.locate.candidates import Candidate, select_candidates
from model_backend.locate.export import (
    DENSIFY,
    MATCH_FIELDS,
    geojson_problems,
    polygon_is_ccw,
    read_matches,
    source_crs_label,
    write_geojson,
    write_gpkg,
)
from model_backend.locate.scores import TileScores

from .conftest import DATA, warp_to

CUSTOM_TM = (  # a transverse Mercator with no EPSG code, on a non-WGS84 ellipsoid
    'PROJCS["Site grid",GEOGCS["GRS 1980 based",DATUM["Site_datum",'
    'SPHEROID["GRS 1980",6378137,298.257222101],TOWGS84[0,0,0,0,0,0,0]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
    'PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",52],PARAMETER["central_meridian",5.3],'
    'PARAMETER["scale_factor",0.9999],PARAMETER["false_easting",150000],PARAMETER["false_northing",400000],'
    'UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)
PROPS = {"photo": "DJI_0061.JPG", "footprint_m": 20.0, "model": "mobilenetv2", "rotations": np.int64(8)}


def make_custom_raster(folder: Path) -> Path:
    with rasterio.open(DATA / "netherlands_aerial_0.25m_epsg28992.tif") as src:
        profile, pixels = src.profile, src.read()
    profile.update(crs=RioCRS.from_wkt(CUSTOM_TM))
    out = folder / "custom_tm.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(pixels)
    return out




@pytest.fixture(scope="module")
def grids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TileGrid]:
    folder = tmp_path_factory.mktemp("rasters")
    specs = {
        "manila_3395": (DATA / "manila_oam_0.10m.tif", 20.0),
        "netherlands_28992": (DATA / "netherlands_aerial_0.25m_epsg28992.tif", 20.0),
        "custom_tm": (make_custom_raster(folder), 20.0),
        "wgs84": (warp_to(DATA / "florida_neon_0.10m.tif", folder / "g.tif", RioCRS.from_epsg(4326)), 10.0),
    }
    return {name: make_grid(open_raster(p), TilingConfig(footprint_m=fp)) for name, (p, fp) in specs.items()}


def all_tiles(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(grid.n_cols), np.arange(grid.n_rows))
    return cols.ravel().astype(np.int32), rows.ravel().astype(np.int32)


def reference_nms(grid, cols, rows, scores, top_k, nms_iou) -> list[tuple[int, int]]:
    """Textbook greedy NMS over the whole sorted list, to check the fast path against."""
    kept: list[tuple[int, int]] = []
    ts = TileScores(grid, cols, rows, scores)
    for i in np.argsort(-scores, kind="stable"):
        if not np.isfinite(scores[i]):
            continue
        c, r = int(cols[i]), int(rows[i])
        if all(ts.iou(c, r, np.array([kc]), np.array([kr]))[0] <= nms_iou for kc, kr in kept):
            kept.append((c, r))
        if len(kept) == top_k:
            break
    return kept


# ---------------------------------------------------------------- candidates

def test_nms_suppresses_neighbours_and_ranks_in_order(grids):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    scores = np.zeros(cols.size)
    at = {(c, r): i for i, (c, r) in enumerate(zip(cols.tolist(), rows.tolist()))}
    scores[at[10, 10]] = 1.0
    for dc in (-1, 0, 1):
        for dr in (-1, 0, 1):
            if dc or dr:
                scores[at[10 + dc, 10 + dr]] = 0.95  # overlapping neighbours of the best tile
    scores[at[20, 3]] = 0.8
    scores[at[2, 18]] = 0.7

    cands = select_candidates(TileScores(grid, cols, rows, scores), top_k=3, nms_iou=0.1)
    assert [c.rank for c in cands] == [1, 2, 3]
    assert [c.score for c in cands] == [1.0, 0.8, 0.7]
    x, y = grid.centres(np.array([20]), np.array([3]))
    assert (cands[1].x, cands[1].y) == (x[0], y[0])

    loose = select_candidates(TileScores(grid, cols, rows, scores), top_k=3, nms_iou=1.0)
    assert [c.score for c in loose] == [1.0, 0.95, 0.95]  # without suppression neighbours crowd in


@pytest.mark.parametrize("name", ["manila_3395", "wgs84"])
@pytest.mark.parametrize("top_k,nms_iou", [(1, 0.1), (5, 0.0), (10, 0.3), (25, 0.1), (1000, 0.0)])
def test_fast_nms_equals_reference(grids, name, top_k, nms_iou):
    grid = grids[name]
    cols, rows = all_tiles(grid)
    rng = np.random.default_rng(top_k)
    scores = np.round(rng.random(cols.size), 2)  # many ties, to exercise tie handling
    scores[rng.random(cols.size) < 0.1] = np.nan
    got = select_candidates(TileScores(grid, cols, rows, scores), top_k, nms_iou)
    assert [(c.x, c.y) for c in got] == [
        tuple(v[0] for v in grid.centres(np.array([c]), np.array([r])))
        for c, r in reference_nms(grid, cols, rows, scores, top_k, nms_iou)
    ]
    assert all(a.score >= b.score for a, b in zip(got, got[1:]))
    assert [c.rank for c in got] == list(range(1, len(got) + 1))


def test_candidate_geometry_and_lonlat(grids):
    for grid in grids.values():
        cols, rows = all_tiles(grid)
        scores = np.random.default_rng(0).random(cols.size)
        to_ll = Transformer.from_crs(CRS.from_wkt(grid.crs_wkt), CRS.from_epsg(4326), always_xy=True)
        for c in select_candidates(TileScores(grid, cols, rows, scores), top_k=5, nms_iou=0.1):
            assert c.polygon[0] == c.polygon[-1] and len(c.polygon) == 5 and polygon_is_ccw(c.polygon)
            centroid = Polygon(c.polygon).centroid
            assert centroid.x == pytest.approx(c.x, abs=1e-6) and centroid.y == pytest.approx(c.y, abs=1e-6)
            assert (c.lon, c.lat) == pytest.approx(to_ll.transform(c.x, c.y), abs=1e-12)
            props = c.to_properties()  # verification fields are there, null until verification runs
            assert set(props) == {"rank", "score", "x", "y", "lon", "lat", "verified", "confidence", "inliers",
                                  "heading_deg", "gsd_m", "tile_x", "tile_y", "structure"}
            assert props["verified"] is None and props["heading_deg"] is None


def test_candidate_argument_checks(grids):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    assert select_candidates(TileScores(grid, cols, rows, np.ones(cols.size)), top_k=0, nms_iou=0.1) == []
    assert select_candidates(TileScores(grid, cols, rows, np.full(cols.size, np.nan)), top_k=5, nms_iou=0.1) == []
    with pytest.raises(InputError):
        select_candidates(TileScores(grid, cols, rows, np.ones(cols.size)), top_k=5, nms_iou=1.5)
    with pytest.raises(InputError):
        select_candidates(TileScores(grid, cols, rows, np.ones(cols.size)), top_k=-1, nms_iou=0.1)


# ---------------------------------------------------------------- GeoJSON

@pytest.mark.parametrize("name", ["manila_3395", "netherlands_28992", "custom_tm", "wgs84"])
def test_geojson_follows_rfc7946(grids, name, tmp_path):
    grid = grids[name]
    cols, rows = all_tiles(grid)
    cands = select_candidates(TileScores(grid, cols, rows, np.random.default_rng(1).random(cols.size)), 5, 0.1)
    out = write_geojson(str(tmp_path / "m.geojson"), cands, grid.crs_wkt, PROPS)
    assert os.listdir(tmp_path) == ["m.geojson"]
    doc = json.loads(Path(out).read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert geojson_problems(doc) == []
    assert doc["type"] == "FeatureCollection" and "crs" not in doc and len(doc["features"]) == len(cands)

    src = CRS.from_wkt(grid.crs_wkt)
    to_ll = Transformer.from_crs(src, CRS.from_epsg(4326), always_xy=True)
    for feat, cand in zip(doc["features"], cands):
        ring = feat["geometry"]["coordinates"][0]
        assert feat["geometry"]["type"] == "Polygon" and len(feat["geometry"]["coordinates"]) == 1
        assert ring[0] == ring[-1] and len(ring) == 4 * DENSIFY + 1 and polygon_is_ccw(ring)
        assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)
        assert all(round(v, 7) == v for p in ring for v in p)
        centroid = shape(feat["geometry"]).centroid
        assert (centroid.x, centroid.y) == pytest.approx((cand.lon, cand.lat), abs=1e-6)
        # Densified vertices lie on the reprojected edge, not on a straight lon/lat chord.
        (x0, y0), (x1, y1) = cand.polygon[0], cand.polygon[1]
        mid = to_ll.transform(x0 + (x1 - x0) / 2, y0 + (y1 - y0) / 2)
        assert any(abs(p[0] - mid[0]) < 2e-7 and abs(p[1] - mid[1]) < 2e-7 for p in ring)

        props = feat["properties"]
        assert feat["id"] == props["rank"] == cand.rank
        assert props["score"] == cand.score and props["photo"] == "DJI_0061.JPG"
        assert (props["x"], props["y"], props["lon"], props["lat"]) == (cand.x, cand.y, cand.lon, cand.lat)
        assert props["footprint_m"] == 20.0 and props["model"] == "mobilenetv2" and props["rotations"] == 8
        assert CRS.from_user_input(props["source_crs"]) == src
    label = doc["features"][0]["properties"]["source_crs"]
    expected = {"manila_3395": "EPSG:3395", "netherlands_28992": "EPSG:28992", "wgs84": "EPSG:4326"}
    assert label == expected.get(name, grid.crs_wkt)  # a custom CRS is written as its WKT, never a guess


def test_antimeridian_footprint_is_split(tmp_path):
    wkt = CRS.from_proj4("+proj=tmerc +lat_0=-17 +lon_0=180 +k=1 +x_0=500000 +y_0=0 +datum=WGS84").to_wkt()
    ring = [(499970.0, -30.0), (500030.0, -30.0), (500030.0, 30.0), (499970.0, 30.0), (499970.0, -30.0)]
    cand = Candidate(rank=1, score=0.5, x=500000.0, y=0.0, lon=180.0, lat=-17.0, polygon=ring)
    doc = json.loads(Path(write_geojson(str(tmp_path / "m.geojson"), [cand], wkt, {})).read_text())
    geom = doc["features"][0]["geometry"]
    assert geojson_problems(doc) == [] and geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 2
    lons = sorted({p[0] for poly in geom["coordinates"] for p in poly[0]})
    assert lons[0] > -180.001 and lons[-1] < 180.001 and -180.0 in lons and 180.0 in lons


def test_validator_catches_violations():
    cw = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]
    doc = {"type": "FeatureCollection", "crs": {"type": "name"},
           "features": [{"type": "Feature", "properties": {},
                         "geometry": {"type": "Polygon", "coordinates": [cw]}},
                        {"type": "Feature", "properties": {},
                         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [0, 1]]]}}]}
    problems = " | ".join(geojson_problems(doc))
    for words in ("'crs'", "wrong way", "not closed", "outside lon/lat"):
        assert words in problems


def test_source_crs_label():
    assert source_crs_label(CRS.from_epsg(28992).to_wkt("WKT1_GDAL")) == "EPSG:28992"
    assert source_crs_label(CUSTOM_TM) == CUSTOM_TM


# ---------------------------------------------------------------- GeoPackage

@pytest.mark.parametrize("name", ["manila_3395", "custom_tm", "wgs84"])
def test_gpkg_keeps_source_crs_and_features(grids, name, tmp_path):
    grid = grids[name]
    cols, rows = all_tiles(grid)
    cands = select_candidates(TileScores(grid, cols, rows, np.random.default_rng(2).random(cols.size)), 5, 0.1)
    out = write_gpkg(str(tmp_path / "m.gpkg"), cands, grid.crs_wkt, PROPS)
    assert os.listdir(tmp_path) == ["m.gpkg"]

    ds = ogr.Open(out)
    assert ds.GetLayerCount() == 1
    lyr = ds.GetLayerByName("matches")
    assert lyr.GetFeatureCount() == len(cands) and lyr.GetGeomType() == ogr.wkbPolygon
    src = osr.SpatialReference()
    src.ImportFromWkt(grid.crs_wkt)
    src.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)  # GPKG layers are x/y (lon/lat) ordered
    assert lyr.GetSpatialRef().IsSame(src)
    assert CRS.from_wkt(lyr.GetSpatialRef().ExportToWkt()) == CRS.from_wkt(grid.crs_wkt)
    defn = lyr.GetLayerDefn()
    fields = [defn.GetFieldDefn(i) for i in range(defn.GetFieldCount())]
    # the one matches schema (MATCH_FIELDS, typed even where every value is null), then the caller's extras
    assert [f.GetName() for f in fields] == [*MATCH_FIELDS, "rotations"]
    assert {f.GetName(): f.GetTypeName() for f in fields} == {
        "rank": "Integer", "score": "Real", "photo": "String", "source_crs": "String", "x": "Real",
        "y": "Real", "lon": "Real", "lat": "Real", "footprint_m": "Real", "footprint_source": "String",
        "footprint_given_m": "Real", "model": "String", "verified": "Integer", "confidence": "Real",
        "inliers": "Integer64",
        "heading_deg": "Real", "gsd_m": "Real", "tile_x": "Real", "tile_y": "Real", "structure": "Real",
        "gps_distance_m": "Real",
        "gps_disagrees": "Integer", "rotations": "Integer64"}
    ds = lyr = None

    feats = read_matches(out)
    assert [f["properties"]["rank"] for f in feats] == [c.rank for c in cands]
    for f, c in zip(feats, cands):
        assert [tuple(p) for p in f["coordinates"][0]] == [tuple(p) for p in c.polygon]
        assert f["properties"]["score"] == c.score and f["properties"]["lon"] == c.lon

    gj = read_matches(write_geojson(str(tmp_path / "m.geojson"), cands, grid.crs_wkt, PROPS))
    assert [f["properties"] for f in gj] == [f["properties"] for f in feats]


def test_empty_results_still_write_valid_files(grids, tmp_path):
    wkt = grids["custom_tm"].crs_wkt
    assert read_matches(write_gpkg(str(tmp_path / "m.gpkg"), [], wkt, PROPS)) == []
    doc = json.loads(Path(write_geojson(str(tmp_path / "m.geojson"), [], wkt, PROPS)).read_text())
    assert doc == {"type": "FeatureCollection", "features": []}


# ---------------------------------------------------------------- atomic writes

def test_failed_writes_leave_nothing_partial(grids, tmp_path, monkeypatch):
    grid = grids["netherlands_28992"]
    cols, rows = all_tiles(grid)
    cands = select_candidates(TileScores(grid, cols, rows, np.random.default_rng(3).random(cols.size)), 3, 0.1)

    for writer, name in ((write_geojson, "m.geojson"), (write_gpkg, "m.gpkg")):
        with pytest.raises(InputError, match="does not exist"):
            writer(str(tmp_path / "missing" / name), cands, grid.crs_wkt, PROPS)
    assert os.listdir(tmp_path) == []

    bad = [Candidate(rank=1, score=float("nan"), x=0.0, y=0.0, lon=0.0, lat=0.0, polygon=cands[0].polygon)]
    with pytest.raises(ValueError):
        write_geojson(str(tmp_path / "m.geojson"), bad, grid.crs_wkt, PROPS)  # JSON has no NaN
    assert os.listdir(tmp_path) == []

    write_gpkg(str(tmp_path / "m.gpkg"), cands, grid.crs_wkt, PROPS)
    before = (tmp_path / "m.gpkg").read_bytes()

    def broken_field(name, value):
        raise RuntimeError("driver failed half way")
    monkeypatch.setattr(export, "ogr_field", broken_field)
    with pytest.raises(RuntimeError, match="half way"):
        write_gpkg(str(tmp_path / "m.gpkg"), cands[:1], grid.crs_wkt, PROPS)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.gpkg"] and (tmp_path / "m.gpkg").read_bytes() == before

    def no_rename(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(export.os, "replace", no_rename)
    with pytest.raises(InputError, match="Cannot replace"):
        write_geojson(str(tmp_path / "m.geojson"), cands, grid.crs_wkt, PROPS)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.gpkg"]
    assert ogr.Open(str(tmp_path / "m.gpkg")).GetLayer(0).GetFeatureCount() == 3

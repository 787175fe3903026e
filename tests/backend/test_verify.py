"""Geometric verification and photo priors, on real orthophotos with exactly known truth.

A view rendered from the raster (model_backend.learn.datasets.synth) has a known footprint, so the homography
the verifier fits can be checked against it; wrong places are a far tile of the same raster and
a photo of another raster. The GPS prior is tested through locate_photo with a JPEG that carries
EXIF GPS, and the CLI flags in one subprocess run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from model_backend.bench.localisation import footprint_iou
from model_backend.cli import build_parser
from model_backend.core.config import QueryConfig
from model_backend.geo.exif import PhotoPriors, read_priors
from model_backend.geo.geodesy import to_wgs84
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets.synth import ViewSpec, render_view
from model_backend.locate.candidates import Candidate
from model_backend.locate.export import geojson_problems, polygon_is_ccw, read_matches
from model_backend.locate.heatmap import NODATA
from model_backend.locate.pipeline import locate_photo
from model_backend.locate.priors import gps_disagrees, nadir_enough, north_up
from model_backend.locate.verify import Verifier, confidence, verify_candidates

REPO = Path(__file__).resolve().parents[2]
MANILA = "manila_oam_0.10m.tif"      # EPSG:3395: map units are not ground metres there
NETHERLANDS = "netherlands_aerial_0.25m_epsg28992.tif"
FP = 40.0


def _spec(info, fx: float, fy: float, **kw) -> ViewSpec:
    cx, cy = info.affine * (info.width * fx, info.height * fy)
    return ViewSpec(cx, cy, FP, **kw)


def _m_per_unit(info) -> float:
    return info.gsd_x_m / abs(info.affine.a)


def _candidate(info, x: float, y: float, score: float, rank: int) -> Candidate:
    """A retrieval candidate: a FP-metre tile centred on (x, y)."""
    h = 0.5 * FP / _m_per_unit(info)
    lon, lat = to_wgs84(info.crs_wkt).transform(x, y)
    ring = [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h), (x - h, y - h)]
    return Candidate(rank=rank, score=score, x=x, y=y, lon=lon, lat=lat, polygon=ring)


def _exif_gps(path: Path, image: np.ndarray, lon: float, lat: float) -> Path:
    """Save a JPEG carrying EXIF GPS (degrees, minutes, seconds), as a drone writes it."""
    def dms(v: float) -> tuple[float, float, float]:
        v = abs(v)
        d, m = int(v), int(abs(v) * 60) % 60
        return float(d), float(m), round((v - d - m / 60) * 3600, 4)

    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    Image.fromarray(image).save(path, exif=exif, quality=95)
    return path


@pytest.fixture(scope="module")
def manila(data_dir: Path):
    info = open_raster(data_dir / MANILA)
    spec = _spec(info, 0.3, 0.35, heading_deg=70.0, tilt_deg=15.0, tilt_azimuth_deg=70.0, scale=1.1,
                 brightness=1.1, contrast=0.9, saturation=0.8, hue_shift=5.0, gamma=1.1, blur_sigma=0.8,
                 noise_sigma=2.0, jpeg_quality=80)
    return info, render_view(info.path, spec)


def test_homography_recovers_the_true_footprint(manila) -> None:
    info, view = manila
    m = _m_per_unit(info)
    off = 0.4 * FP / m  # retrieval's tile is up to half a footprint off: start from a tile 16 m away
    with Verifier(info, view.image, FP) as ver:
        v = ver.verify(view.spec.cx + off, view.spec.cy - off)
    assert v.verified, v.reason
    err = math.hypot(v.centre[0] - view.spec.cx, v.centre[1] - view.spec.cy) * m
    assert err < 2.0
    assert footprint_iou(v.quad, view.truth_polygon) > 0.8
    assert abs((v.heading_deg - 70.0 + 180) % 360 - 180) < 5.0
    assert v.gsd_m == pytest.approx(FP * 1.1 / 480, rel=0.25)  # tilt stretches the far side a little
    assert v.inliers >= 12 and 0.5 <= v.confidence <= 1.0
    # The homography maps the photo's corners to the truth corners (TL, TR, BR, BL).
    for (x, y), (tx, ty) in zip(v.quad, view.truth_polygon):
        assert math.hypot(x - tx, y - ty) * m < 3.0


def test_lonlat_raster_gives_ground_heading_and_size(manila, tmp_path: Path) -> None:
    """In EPSG:4326 a degree of longitude is shorter than one of latitude: heading and GSD must not skew."""
    from pyproj import Geod
    from rasterio.crs import CRS as RioCRS

    from .conftest import warp_to

    info, view = manila
    geo = open_raster(warp_to(Path(info.path), tmp_path / "manila_4326.tif", RioCRS.from_epsg(4326)))
    lon, lat = to_wgs84(info.crs_wkt).transform(view.spec.cx, view.spec.cy)
    with Verifier(geo, view.image, FP) as ver:
        v = ver.verify(lon + 1e-4, lat - 1e-4)
    assert v.verified, v.reason
    assert Geod(ellps="WGS84").inv(lon, lat, *v.centre)[2] < 2.0
    assert abs((v.heading_deg - 70.0 + 180) % 360 - 180) < 5.0
    assert v.gsd_m == pytest.approx(FP * 1.1 / 480, rel=0.25)


def test_wrong_places_are_rejected(manila, data_dir: Path) -> None:
    info, view = manila
    far_x, far_y = info.affine * (info.width * 0.85, info.height * 0.85)  # ~130 m away in x and y
    with Verifier(info, view.image, FP) as ver:
        v = ver.verify(far_x, far_y)
    assert not v.verified and v.confidence < 0.5 and v.reason
    nl = open_raster(data_dir / NETHERLANDS)  # a photo of Manila on a Dutch raster: nowhere is right
    with Verifier(nl, view.image, FP) as ver:
        for fx, fy in ((0.3, 0.3), (0.5, 0.5), (0.7, 0.6)):
            v = ver.verify(*(nl.affine * (nl.width * fx, nl.height * fy)))
            assert not v.verified, (fx, fy, v.inliers, v.matches)


def test_reranking_puts_the_verified_place_first(manila) -> None:
    info, view = manila
    far = info.affine * (info.width * 0.85, info.height * 0.8)
    near = (view.spec.cx + 10.0, view.spec.cy + 12.0)
    cands = [_candidate(info, *far, 0.9, 1), _candidate(info, *near, 0.7, 2)]
    with rasterio.open(info.path) as ds:
        ranked, secs = verify_candidates(info, view.image, cands, FP, dataset=ds)
    best, other = ranked
    assert (best.rank, best.verified, other.rank, other.verified) == (1, True, 2, False)
    assert best.score == 0.7 and (best.tile_x, best.tile_y) == near and best.tile_polygon == cands[1].polygon
    assert math.hypot(best.x - view.spec.cx, best.y - view.spec.cy) * _m_per_unit(info) < 2.0
    assert (best.lon, best.lat) == pytest.approx(to_wgs84(info.crs_wkt).transform(best.x, best.y))
    ring = best.polygon
    assert len(ring) == 5 and ring[0] == ring[-1] and polygon_is_ccw(ring)
    assert other.polygon == cands[0].polygon and other.confidence == 0.0 and other.heading_deg is None
    assert 0 < secs < 10
    props = best.to_properties()
    assert {"verified", "confidence", "inliers", "heading_deg", "gsd_m", "tile_x", "tile_y"} <= set(props)


def test_confidence_and_priors_helpers() -> None:
    assert confidence(0, 0.0) == 0.0 and confidence(8, 0.5) < confidence(40, 0.5) < confidence(40, 0.9) <= 1.0
    assert nadir_enough(PhotoPriors()) and nadir_enough(PhotoPriors(gimbal_pitch_deg=-70.0))
    assert not nadir_enough(PhotoPriors(gimbal_pitch_deg=-45.0))
    assert not gps_disagrees(45.0, 20.0) and gps_disagrees(85.0, 40.0) and not gps_disagrees(75.0, 40.0)
    # North-up: a photo whose top faces east, turned 90° clockwise, shows east on the right.
    img = np.zeros((40, 60, 3), np.uint8)
    img[:5, 20:40] = 255  # a bar at the top edge: east on the ground
    up = north_up(img, 90.0)
    assert up.shape == img.shape and up[12:28, 45:50].mean() > 200 and up[:5, 20:40].max() < 50


@pytest.fixture(scope="module")
def gps_run(manila, embedder, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One photo with EXIF GPS at its true centre, located with --prior-radius-m 30; shared cache."""
    info, view = manila
    work = tmp_path_factory.mktemp("verify_gps")
    lon, lat = to_wgs84(info.crs_wkt).transform(view.spec.cx, view.spec.cy)
    photo = _exif_gps(work / "gps.jpg", view.image, lon, lat)
    assert read_priors(str(photo)).lat == pytest.approx(lat, abs=1e-6)
    res = locate_photo(info.path, str(photo), str(work / "out"), query=QueryConfig(footprint_m=FP),
                       cache_dir=str(work / "cache"), embedder=embedder, prior_radius_m=30.0)
    return {"work": work, "photo": photo, "res": res, "lonlat": (lon, lat)}


def test_gps_prior_restricts_scoring_and_verifies(manila, gps_run) -> None:
    info, view = manila
    res = gps_run["res"]
    m = _m_per_unit(info)
    for c in res.candidates:  # every scored tile lies within the radius of the GPS position
        assert math.hypot(c.tile_x - view.spec.cx, c.tile_y - view.spec.cy) * m <= 30.0 + 1e-6
    with rasterio.open(res.heatmap_path) as ds:
        heat = ds.read(1)
    assert (heat == NODATA).mean() > 0.5  # most of the raster was not scored
    line = res.json_line()
    assert line["verified"] is True and line["confidence"] >= 0.5 and line["gps_disagrees"] is False
    assert math.hypot(line["best_x"] - view.spec.cx, line["best_y"] - view.spec.cy) * m < 2.0
    assert line["footprint_wkt"].startswith("POLYGON ((") and line["gps_distance_m"] < 2.0


def test_verified_geojson_is_rfc7946_with_ccw_footprint(manila, gps_run) -> None:
    info, view = manila
    res = gps_run["res"]
    doc = json.loads(Path(res.geojson_path).read_text())
    assert geojson_problems(doc) == []
    feat = doc["features"][0]
    props = feat["properties"]
    assert props["verified"] is True and props["rank"] == 1 and props["gps_disagrees"] is False
    assert props["inliers"] >= 12 and 0.5 <= props["confidence"] <= 1.0 and props["gsd_m"] > 0
    ring = feat["geometry"]["coordinates"][0]
    assert polygon_is_ccw(ring)
    to_ll = to_wgs84(info.crs_wkt)
    truth = [to_ll.transform(x, y) for x, y in view.truth_polygon]
    assert footprint_iou([tuple(p) for p in ring], truth) > 0.8
    gpkg = read_matches(res.gpkg_path)[0]["properties"]
    assert gpkg["verified"] in (True, 1) and gpkg["heading_deg"] == pytest.approx(props["heading_deg"])


def test_gps_disagreement_is_flagged(manila, embedder, gps_run) -> None:
    info, view = manila
    work = gps_run["work"]
    wrong_x, wrong_y = info.affine * (info.width * 0.8, info.height * 0.8)  # ~100 m off in x and y
    photo = _exif_gps(work / "liar.jpg", view.image, *to_wgs84(info.crs_wkt).transform(wrong_x, wrong_y))
    res = locate_photo(info.path, str(photo), str(work / "out"), query=QueryConfig(footprint_m=FP, top_k=3),
                       cache_dir=str(work / "cache"), embedder=embedder)
    line = res.json_line()
    assert line["verified"] is True and line["gps_disagrees"] is True and line["gps_distance_m"] > 80.0


def test_cli_flags(manila, gps_run) -> None:
    args = build_parser().parse_args(["locate", "r.tif", "p.jpg", "--out", "o", "--no-verify",
                                      "--prior-radius-m", "25"])
    assert args.verify is False and args.prior_radius_m == 25.0
    assert build_parser().parse_args(["locate", "r.tif", "p.jpg", "--out", "o"]).verify is None
    assert build_parser().parse_args(["locate", "r.tif", "p.jpg", "--out", "o", "--verify"]).verify is True
    info, view = manila
    work = gps_run["work"]
    env = {**os.environ, "CDIKT_CACHE_DIR": str(work / "cache")}  # the index gps_run built: no re-embedding
    proc = subprocess.run([sys.executable, "-m", "model_backend", "locate", info.path, str(gps_run["photo"]),
                           "--out", str(work / "cli"), "--footprint-m", str(FP), "--no-verify",
                           "--prior-radius-m", "30"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["verified"] is False and line["confidence"] is None and "verify_seconds" not in line
    assert line["gps_disagrees"] is False and line["gps_distance_m"] <= 30.0
    assert line["footprint_wkt"].startswith("POLYGON ((")

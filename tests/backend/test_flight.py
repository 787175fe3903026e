"""A flight located as a track: order, motion between photos, outputs, outliers, cancel and resume."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_backend.cli import main
from model_backend.core.config import QueryConfig
from model_backend.core.errors import Cancelled, InputError
from model_backend.core.requests import FlightRequest
from model_backend.geo.exif import load_photo, read_priors
from model_backend.learn.datasets.flights import (
    START,
    FlightPlan,
    exif_bytes,
    flatten,
    replay_from_log,
    simulate_flight,
)
from model_backend.locate.flight.motion import features, relative_motion
from model_backend.locate.flight.order import order_flight
from model_backend.locate.flight.run import locate_flight

NETHERLANDS = "netherlands_aerial_0.25m_epsg28992.tif"
FOOT = 50.0


@pytest.fixture(scope="module")
def flight(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """12 photos of a simulated survey over a held-out raster, plus one photo of another place slipped in."""
    root = tmp_path_factory.mktemp("flight")
    truth = simulate_flight(data_dir / NETHERLANDS, FlightPlan("lawnmower", 12, FOOT), 5, root / "photos")
    stray = simulate_flight(data_dir / "manila_oam_0.10m.tif", FlightPlan("free", 1, 40.0), 1, root / "stray")[0]
    # Taken between photos 5 and 6 of the flight, by its clock: the track must skip it, not bend to it.
    when = datetime.fromtimestamp(START.timestamp() + (truth[5].time_s + truth[6].time_s) / 2, UTC)
    with Image.open(stray.path) as im:
        im.save(root / "photos" / "photo_005b.jpg", quality=95, exif=exif_bytes(when, None))
    return root, truth


def _request(root: Path, data_dir: Path, out: str = "out", **kw) -> FlightRequest:
    return FlightRequest(str(data_dir / NETHERLANDS), (str(root / "photos"),), str(root / out),
                         query=QueryConfig(footprint_m=FOOT, structure=False), verify=False,
                         cache_dir=str(root / "cache"), **kw)


def test_photos_are_ordered_by_their_clock_else_by_name(flight, tmp_path: Path) -> None:
    root, truth = flight
    photos, how = order_flight([str(root / "photos")])
    names = [Path(p.path).name for p in photos]
    assert how == "time" and names.index("photo_005b.jpg") == 6
    assert names[:6] == [f"photo_{i:03d}.jpg" for i in range(6)]
    assert np.all(np.diff([p.taken_s for p in photos]) > 0)
    for name in ("b.jpg", "a.jpg"):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / name)
    shutil.copy(truth[0].path, tmp_path / "c.jpg")
    photos, how = order_flight([str(tmp_path)])
    assert how == "name" and [Path(p.path).name for p in photos] == ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(InputError, match="No photos"):
        order_flight([str(tmp_path / "empty")] if (tmp_path / "empty").mkdir() is None else [])


def test_a_flight_log_gives_times_and_positions(data_dir: Path) -> None:
    log = data_dir / "uavvisloc" / "03.csv"
    photo = data_dir / "uavvisloc" / "03_0565.JPG"
    (p,), how = order_flight([str(photo)], str(log))
    rows = list(csv.DictReader(log.open()))
    row = next(r for r in rows if r["filename"] == photo.name)
    assert how == "time" and p.priors.lat == pytest.approx(float(row["lat"])) and p.taken_s is not None
    first = next(r for r in rows if r["num"] == "1")
    assert read_priors(str(photo)).taken_s != p.taken_s or first  # the log's time wins over EXIF's


def test_motion_between_consecutive_photos_is_measured(flight) -> None:
    _, truth = flight
    a, b = truth[1], truth[2]
    m = relative_motion(features(load_photo(a.path)), features(load_photo(b.path)))
    true_shift = np.hypot(b.spec.cx - a.spec.cx, b.spec.cy - a.spec.cy) / (a.spec.footprint_m * a.spec.scale)
    bearing = np.degrees(np.arctan2(b.spec.cx - a.spec.cx, b.spec.cy - a.spec.cy)) % 360
    assert m is not None and abs(m.shift - true_shift) < 0.08, (m, true_shift)
    assert abs((a.spec.heading_deg + m.direction_deg - bearing + 180) % 360 - 180) < 15
    far = relative_motion(features(load_photo(truth[0].path)), features(load_photo(truth[5].path)))
    assert far is None, far  # 100 m apart on the same leg: no overlap, no estimate
    # A photo with nothing to match says nothing: its failed matches are "unknown", not "no overlap".
    bare = flatten(load_photo(b.path), np.random.default_rng(0))
    assert features(load_photo(b.path)).textured and not features(bare).textured
    assert relative_motion(features(load_photo(a.path)), features(bare)) is None


def test_flight_track_outputs_outlier_cancel_and_resume(flight, data_dir: Path) -> None:
    root, truth = flight
    calls = []

    def cancel_after_five() -> bool:
        return len(list((root / "out").glob("*.flight.json"))) >= 5 if (root / "out").exists() else False

    with pytest.raises(Cancelled):
        locate_flight(_request(root, data_dir), cancel=cancel_after_five)
    assert len(list((root / "out").glob("*.flight.json"))) == 5
    res = locate_flight(_request(root, data_dir), progress=lambda f, m: calls.append((f, m)))
    assert res.reused == 5 and res.order_source == "time" and not res.failed
    assert any(m.startswith("Photo 6 of 13") for _, m in calls)
    by_name = {Path(line["photo"]).name: line for line in res.lines}
    assert by_name["photo_005b.jpg"]["flag"] == "outlier"
    hits = 0
    for t in truth:
        line = by_name[Path(t.path).name]
        hits += np.hypot(line["best_x"] - t.spec.cx, line["best_y"] - t.spec.cy) <= FOOT
        assert {"independent_x", "independent_y", "track_confidence", "track_rank", "heatmap"} <= set(line)
        assert Path(line["heatmap"]).is_file()
    assert hits >= 11, hits
    from osgeo import ogr

    ds = ogr.Open(res.gpkg_path)
    track = ds.GetLayerByName("track")
    feature = track.GetNextFeature()  # keep the feature: its geometry dies with it
    geom = feature.GetGeometryRef()
    assert geom.GetGeometryName().startswith("LINESTRING") and geom.GetPointCount() == 12
    assert geom.GetM(11) > geom.GetM(0) > -1e-9
    assert ds.GetLayerByName("photos").GetFeatureCount() == 13
    feature = geom = track = ds = None
    with open(res.csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and rows[6]["flag"] == "outlier" and rows[6]["chosen_rank"] == ""
    again = locate_flight(_request(root, data_dir))
    assert again.reused == 13 and [ln["best_x"] for ln in again.lines] == [ln["best_x"] for ln in res.lines]


def test_a_featureless_stretch_is_flagged_not_forced_and_the_track_goes_on(flight, data_dir: Path) -> None:
    """Three photos over ground with nothing to match (a bare field: blurred, a sixth of its contrast):
    alone they land anywhere; in the track each is either right or flagged, and the photos after the
    stretch are found again."""
    root, _ = flight
    plan = FlightPlan("lawnmower", 10, FOOT, featureless=(4, 3))
    truth = simulate_flight(data_dir / NETHERLANDS, plan, 6, root / "bare")
    request = FlightRequest(str(data_dir / NETHERLANDS), (str(root / "bare"),), str(root / "bare_out"),
                            query=QueryConfig(footprint_m=FOOT, structure=False), verify=False,
                            cache_dir=str(root / "cache"))
    res = locate_flight(request)
    assert not res.failed and sum(t.featureless for t in truth) == 3
    by_name = {Path(line["photo"]).name: line for line in res.lines}
    track_hit, alone_hit = {}, {}
    for t in truth:
        line = by_name[Path(t.path).name]
        track_hit[t.path] = np.hypot(line["best_x"] - t.spec.cx, line["best_y"] - t.spec.cy) <= FOOT
        alone_hit[t.path] = np.hypot(line["independent_x"] - t.spec.cx, line["independent_y"] - t.spec.cy) <= FOOT
        if t.featureless:
            assert track_hit[t.path] or line["flag"] in ("uncertain", "outlier"), line
    bare = [t.path for t in truth if t.featureless]
    assert sum(alone_hit[p] for p in bare) <= 1  # really featureless: alone, mostly wrong
    assert sum(track_hit[t.path] for t in truth if not t.featureless) >= 6


def test_a_real_flights_path_replayed_from_its_uavvisloc_log(flight, data_dir: Path) -> None:
    """UAV-VisLoc flight 03's own positions and clock (photos 91-102: the end of a leg, the turn with its
    longer gap, the next leg), flown over a held-out raster: the track is scored against the log's truth."""
    root, _ = flight
    rows = replay_from_log(data_dir / "uavvisloc" / "03.csv", first=90, count=12)
    gaps = np.diff([t for _, _, t in rows])
    assert len(rows) == 12 and set(np.round(gaps[:3])) <= {7.0, 8.0} and gaps.max() > 10  # the turn
    plan = FlightPlan("replay", len(rows), FOOT, replay=rows, overlap=0.7)
    truth = simulate_flight(data_dir / NETHERLANDS, plan, 3, root / "replay")
    assert [round(t.time_s) for t in truth] == [round(t - rows[0][2]) for _, _, t in rows]
    request = FlightRequest(str(data_dir / NETHERLANDS), (str(root / "replay"),), str(root / "replay_out"),
                            query=QueryConfig(footprint_m=FOOT, structure=False), verify=False,
                            cache_dir=str(root / "cache"))
    res = locate_flight(request)
    by_name = {Path(line["photo"]).name: line for line in res.lines}
    hits = [np.hypot(by_name[Path(t.path).name]["best_x"] - t.spec.cx,
                     by_name[Path(t.path).name]["best_y"] - t.spec.cy) <= t.spec.footprint_m * t.spec.scale
            for t in truth]
    assert res.order_source == "time" and sum(hits) >= 11, hits


def test_cli_locate_flight(flight, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = flight
    code = main(["locate-flight", str(data_dir / NETHERLANDS), str(root / "photos"), "--out", str(root / "cli"),
                 "--footprint-m", str(FOOT), "--no-verify", "--cache-dir", str(root / "cache"), "--no-motion"])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(out) == 14 and out[-1]["flight"] == 13 and out[-1]["order"] == "time"
    assert all("independent_x" in line and "flag" in line for line in out[:-1])
    assert main(["locate-flight", str(data_dir / NETHERLANDS), str(root / "nowhere"), "--out", str(root / "x")]) == 2
    assert "neither a photo nor a folder" in capsys.readouterr().err
    assert main(["locate-flight", str(data_dir / NETHERLANDS), str(root / "photos"), "--out", str(root / "x"),
                 "--states", "0"]) == 2


def test_gps_in_the_photos_is_a_prior_that_pins_a_cross_year_track(data_dir: Path, tmp_path: Path) -> None:
    """Photos of 2020 on the 2015 map (other crops): alone mostly wrong; with their EXIF GPS (5 m error) as a
    prior, the track lands on the truth, and every row reports its GPS distance."""
    naip = {y: data_dir / f"naip_northdakota_5m_{y}.tif" for y in (2015, 2020)}
    truth = simulate_flight(naip[2015], FlightPlan("free", 8, 400.0, speed_m_s=12.0), 4, tmp_path / "photos",
                            photo_raster=naip[2020], gps=True)
    request = FlightRequest(str(naip[2015]), (str(tmp_path / "photos"),), str(tmp_path / "out"),
                            query=QueryConfig(footprint_m=400.0, structure=False), verify=False,
                            cache_dir=str(tmp_path / "cache"))
    res = locate_flight(request)
    hits = [np.hypot(line["best_x"] - t.spec.cx, line["best_y"] - t.spec.cy) <= 400.0
            for line, t in zip(res.lines, truth)]
    assert sum(hits) >= 7, hits
    assert all(line.get("gps_distance_m") is not None for line in res.lines)

"""locate_photo end to end (no subprocess): outputs, ranking, footprint choice, accuracy, cancelling."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import CRS, Transformer

from model_backend.core.config import QueryConfig, TilingConfig
from model_backend.core.errors import Cancelled
from model_backend.geo.exif import read_priors
from model_backend.geo.raster import open_raster
from model_backend.geo.tiling import make_grid
from model_backend.learn.datasets.synth import ViewSpec, make_views, render_view, save_view
from model_backend.locate.heatmap import NODATA
from model_backend.locate.pipeline import LocateResult, locate_photo
from model_backend.locate.structure import DEFAULT_STRUCTURE

MANILA = "manila_oam_0.10m.tif"    # 2048 px at 0.1 m: ~198 m square, black collars
FLORIDA = "florida_neon_0.10m.tif"  # 400 px at 0.1 m: 40 m square, cheap to index at any footprint
FOOTPRINT = 40.0
TOP_K = 4

JSON_KEYS = {"photo", "best_lon", "best_lat", "best_x", "best_y", "score", "seconds", "footprint_m",
             "footprint_source", "heatmap", "geojson", "gpkg", "candidates"}


def _nadir_view(raster: str, footprint_m: float, seed: int):
    """A plain nadir, north-up view of a random valid place: tilt 0, heading 0, no photometric change."""
    drawn = make_views(raster, 1, footprint_m, seed, max_tilt_deg=0.0, photometric=False, scale_range=(1.0, 1.0))[0]
    view = render_view(raster, replace(drawn.spec, heading_deg=0.0, tilt_deg=0.0, tilt_azimuth_deg=0.0))
    assert view.valid_fraction > 0.99
    return view


def _box(c) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in c.polygon], [p[1] for p in c.polygon]
    return min(xs), min(ys), max(xs), max(ys)


def _iou(a, b) -> float:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _box(a), _box(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union


@pytest.fixture(scope="module")
def manila_run(data_dir: Path, embedder, tmp_path_factory: pytest.TempPathFactory):
    """One locate of a nadir view on Manila with the footprint given: shared by the output checks."""
    raster = str(data_dir / MANILA)
    work = tmp_path_factory.mktemp("locate_manila")
    view = _nadir_view(raster, FOOTPRINT, seed=3)
    photo = work / "nadir.jpg"
    save_view(view, str(photo))
    progress: list[float] = []
    # tolerance 0: the footprint given exactly (the search around it has its own tests below)
    query = QueryConfig(footprint_m=FOOTPRINT, top_k=TOP_K, footprint_tolerance=0.0)
    res = locate_photo(raster, str(photo), str(work / "out"), query=query,
                       cache_dir=str(work / "cache"), embedder=embedder,
                       progress=lambda f, msg: progress.append(f))
    return raster, view, res, progress


def test_nadir_view_is_found(manila_run) -> None:
    _, view, res, _ = manila_run
    best = res.best
    dist = math.hypot(best.x - view.spec.cx, best.y - view.spec.cy)
    assert dist <= FOOTPRINT, f"best candidate {dist:.1f} m from the truth"
    assert best.score > 0.8


def test_outputs_exist_and_result_fields(manila_run) -> None:
    raster, _, res, progress = manila_run
    assert isinstance(res, LocateResult)
    stem = Path(res.photo).stem
    for path, suffix in ((res.heatmap_path, ".heatmap.tif"), (res.geojson_path, ".matches.geojson"),
                         (res.gpkg_path, ".matches.gpkg")):
        assert Path(path).is_file() and Path(path).name == stem + suffix
    assert (Path(res.index_dir) / "manifest.json").is_file()
    assert res.footprint_m == FOOTPRINT and res.footprint_source == "user"
    assert res.footprint_given_m == FOOTPRINT and [f for f, _ in res.footprints_tried] == [FOOTPRINT]
    assert res.seconds > 0 and res.model_sha256 and CRS.from_wkt(res.crs_wkt) == CRS.from_wkt(
        open_raster(raster).crs_wkt)
    assert progress and progress[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in progress)
    line = res.json_line()
    assert set(line) >= JSON_KEYS
    json.dumps(line)  # plain JSON types only
    assert line["photo"] == res.photo and line["footprint_source"] == "user" and line["candidates"] == TOP_K
    assert line["best_x"] == pytest.approx(res.best.x, abs=1e-3)
    assert line["best_lat"] == pytest.approx(res.best.lat, abs=1e-7)
    assert line["score"] == pytest.approx(res.best.score, abs=1e-5)
    gj = json.loads(Path(res.geojson_path).read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(res.candidates)


def test_heatmap_is_in_the_raster_crs_and_aligned(manila_run) -> None:
    raster, _, res, _ = manila_run
    info = open_raster(raster)
    grid = make_grid(info, TilingConfig(footprint_m=FOOTPRINT))
    with rasterio.open(res.heatmap_path) as hm:
        assert CRS.from_wkt(hm.crs.to_wkt()) == CRS.from_wkt(info.crs_wkt)
        t, r = hm.transform, info.affine
        assert (t.c, t.f) == pytest.approx((r.c, r.f), abs=1e-9)        # same origin as the raster
        assert t.a == pytest.approx(r.a * grid.step_x) and t.e == pytest.approx(r.e * grid.step_y)
        assert t.b == 0 and t.d == 0
        assert (hm.width, hm.height) == (grid.cell_cols, grid.cell_rows)
        assert hm.dtypes[0] == "float32" and hm.nodata == NODATA
        data = hm.read(1, masked=True)
    assert data.count() > 0 and float(data.min()) >= -1.0
    # Overlap-averaged cells never exceed the best tile's score.
    assert float(data.max()) <= res.best.score + 1e-5


def test_candidates_ranked_top_k_and_suppressed(manila_run) -> None:
    raster, _, res, _ = manila_run
    cands = res.candidates
    assert len(cands) == TOP_K
    assert [c.rank for c in cands] == list(range(1, TOP_K + 1))
    # verified first; the others in the structure re-rank's order: edge correlation + the embedding's evidence
    verified = [c.verified for c in cands]
    assert verified == sorted(verified, reverse=True)
    med, std, w = res.extra["score_median"], res.extra["score_std"], DEFAULT_STRUCTURE.embedding_weight
    keys = [c.structure + w * (c.score - med) / std for c in cands
            if not c.verified and c.tile_polygon is not None]   # placed (moved) by the re-rank
    assert keys == sorted(keys, reverse=True) and len(keys) >= 1
    nms = QueryConfig().nms_iou
    for i in range(len(cands)):
        for j in range(i + 1, len(cands)):
            # NMS acts on tiles; a verified candidate's polygon is the refined photo footprint (verify.py)
            ti, tj = (replace(c, polygon=c.tile_polygon or c.polygon) for c in (cands[i], cands[j]))
            assert _iou(ti, tj) <= nms + 1e-9, (i, j)
    to_ll = Transformer.from_crs(CRS.from_wkt(res.crs_wkt), CRS.from_epsg(4326), always_xy=True)
    for c in cands:
        lon, lat = to_ll.transform(c.x, c.y)
        assert (c.lon, c.lat) == pytest.approx((lon, lat), abs=1e-7)
        x0, y0, x1, y1 = _box(c)
        assert x0 < c.x < x1 and y0 < c.y < y1
        assert c.polygon[0] == c.polygon[-1]


@pytest.mark.parametrize("factor", [1.3, 1 / 1.3])
def test_a_footprint_given_30_percent_off_is_searched_around(
        data_dir: Path, embedder, tmp_path: Path, factor: float) -> None:
    """An analyst's guess of the ground size is rarely right: a nadir view 40 m across, located with 52 m
    (or 30.8 m) typed, is searched at the sizes around the guess and found; the size reported is the one
    that matched best (the bench's `footprint` part measures how often that is the true one: 50-85 %)."""
    raster = str(data_dir / MANILA)
    view = _nadir_view(raster, FOOTPRINT, seed=7)
    photo = tmp_path / "guess.jpg"
    save_view(view, str(photo))
    given = round(FOOTPRINT * factor, 2)
    res = locate_photo(raster, str(photo), str(tmp_path / "out"), query=QueryConfig(footprint_m=given, top_k=2),
                       cache_dir=str(tmp_path / "cache"), embedder=embedder, verify=False)
    tried = [f for f, _ in res.footprints_tried]
    assert tried == sorted([round(given / 1.3, 2), given, round(given * 1.3, 2)])
    assert res.footprint_m in tried and res.footprint_given_m == given
    assert max(res.footprints_tried, key=lambda t: t[1])[0] == res.footprint_m  # chosen = best-scoring size
    assert math.hypot(res.best.x - view.spec.cx, res.best.y - view.spec.cy) <= FOOTPRINT
    line = res.json_line()
    assert line["footprint_m"] == res.footprint_m and line["footprint_given_m"] == given
    assert [f for f, _ in line["footprints_tried"]] == tried
    assert json.loads(Path(res.geojson_path).read_text())["features"][0]["properties"]["footprint_given_m"] == given
    sizes = ", ".join(f"{f:g}" for f in tried)
    assert res.footprint_note() in (f"{res.footprint_m:g} m ({given:g} m typed; best of {sizes} m)",
                                    f"{given:g} m (typed; best of {sizes} m)")
    with rasterio.open(res.heatmap_path) as hm:  # the heatmap is the chosen size's
        grid = make_grid(open_raster(raster), TilingConfig(footprint_m=res.footprint_m))
        assert (hm.width, hm.height) == (grid.cell_cols, grid.cell_rows)


def test_the_sizes_around_a_given_footprint_keep_to_what_the_raster_holds(data_dir: Path) -> None:
    from model_backend.locate.pipeline import around, footprint_limits

    florida = open_raster(str(data_dir / FLORIDA))  # 40 m square at 0.1 m: holds 3.2 m to 38 m
    smallest, limit = footprint_limits(florida)
    assert around(20.0, 0.3, florida) == [15.38, 20.0, 26.0]
    assert around(35.0, 0.3, florida) == [26.92, 35.0]  # 45.5 m does not fit: dropped
    assert around(20.0, 0.0, florida) == [20.0]
    assert around(60.0, 0.3, florida)[-1] == 60.0  # the given size stays, so make_grid says why it cannot be
    assert all(smallest <= f <= limit for f in around(35.0, 0.5, florida))
    with pytest.raises(Exception, match="tolerance"):
        QueryConfig(footprint_tolerance=float("nan"))
    with pytest.raises(Exception, match="tolerance"):
        QueryConfig(footprint_tolerance=1.5)


def test_unknown_footprint_runs_a_scale_search(data_dir: Path, embedder, tmp_path: Path) -> None:
    raster = str(data_dir / FLORIDA)
    photo = tmp_path / "no_exif.jpg"
    save_view(_nadir_view(raster, 20.0, seed=1), str(photo))
    assert read_priors(str(photo)).relative_altitude_m is None
    res = locate_photo(raster, str(photo), str(tmp_path / "out"), query=QueryConfig(top_k=2),
                       cache_dir=str(tmp_path / "cache"), embedder=embedder)
    assert res.footprint_source == "scale search" and res.json_line()["footprint_source"] == "scale search"
    folders = [p for p in (tmp_path / "cache" / "indexes").iterdir() if (p / "manifest.json").is_file()]
    assert len(folders) == len(QueryConfig().scale_search)
    searched = {json.loads((p / "manifest.json").read_text())["tiling"]["footprint_m"] for p in folders}
    assert len(searched) == len(folders) and res.footprint_m in searched


DJI_XMP = b"""<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="DJI Meta Data" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
 drone-dji:RelativeAltitude="+20.00" drone-dji:GimbalYawDegree="+0.00" drone-dji:GimbalPitchDegree="-90.00"/>
</rdf:RDF></x:xmpmeta>"""


def test_exif_height_sets_the_footprint(data_dir: Path, embedder, tmp_path: Path) -> None:
    # The real Inspire 1 photo (FC350: 6.17 mm sensor, 3.61 mm lens, 4:3) with DJI's XMP height added.
    jpeg = (data_dir / "DJI_0061.JPG").read_bytes()
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + DJI_XMP
    photo = tmp_path / "dji_xmp.jpg"
    photo.write_bytes(jpeg[:2] + struct.pack(">BBH", 0xFF, 0xE1, len(payload) + 2) + payload + jpeg[2:])
    expected = 20.0 * 6.17 / 3.61 * 0.75  # ~25.6 m: fits the 40 m Florida raster
    assert read_priors(str(photo)).ground_short_side_m() == pytest.approx(expected)
    res = locate_photo(str(data_dir / FLORIDA), str(photo), str(tmp_path / "out"), query=QueryConfig(top_k=1),
                       cache_dir=str(tmp_path / "cache"), embedder=embedder)
    assert res.footprint_source == "exif" and res.footprint_given_m == pytest.approx(expected, abs=0.01)
    tried = [f for f, _ in res.footprints_tried]  # EXIF's size and the sizes around it that fit
    assert expected == pytest.approx(tried[1], abs=0.01) and len(tried) == 3 and res.footprint_m in tried
    assert len(list((tmp_path / "cache" / "indexes").iterdir())) == 3


def test_cancel_raises_and_leaves_no_finished_index(data_dir: Path, embedder, tmp_path: Path) -> None:
    raster = str(data_dir / FLORIDA)
    photo = tmp_path / "p.jpg"
    save_view(_nadir_view(raster, 10.0, seed=2), str(photo))
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        locate_photo(raster, str(photo), str(out), query=QueryConfig(footprint_m=10.0),
                     cache_dir=str(tmp_path / "cache"), embedder=embedder, cancel=lambda: True)
    assert not list(tmp_path.rglob("manifest.json"))
    assert not out.exists() or not any(out.iterdir())  # nothing half-written for the photo either


def test_scale_search_keeps_to_the_sizes_a_coarse_raster_can_hold(data_dir: Path) -> None:
    """At 5 m a pixel, the ladder's 36 m rung is 7 pixels across: it is skipped, not an error."""
    from model_backend.geo.tiling import MIN_TILE_PX
    from model_backend.locate.pipeline import choose_footprints

    coarse = open_raster(str(data_dir / "naip_northdakota_5m_2015.tif"))
    photo = str(data_dir / "sues200" / sorted(p.name for p in (data_dir / "sues200").iterdir())[0])
    sizes, source, given = choose_footprints(coarse, photo, TilingConfig(footprint_m=60.0), QueryConfig())
    assert source == "scale search" and given is None and sizes == [60.0, 96.0]
    assert all(fp / coarse.gsd_x_m >= MIN_TILE_PX for fp in sizes)
    for fp in sizes:
        make_grid(coarse, TilingConfig(footprint_m=fp))  # each can be indexed
    fine = open_raster(str(data_dir / "manila_oam_0.10m.tif"))
    assert choose_footprints(fine, photo, TilingConfig(footprint_m=60.0), QueryConfig())[0] == [36.0, 60.0, 96.0]


def test_progress_names_each_stage_and_counts_tiles(data_dir: Path, tmp_path: Path) -> None:
    """What the dock shows: the model loading, the photo, then tiles counted, in order, never going back."""
    raster = str(data_dir / "manila_oam_0.10m.tif")
    view = _nadir_view(raster, 40.0, 3)
    photo = tmp_path / "v.jpg"
    save_view(view, str(photo))
    seen: list[tuple[float, str]] = []
    locate_photo(raster, str(photo), str(tmp_path / "out"), tiling=TilingConfig(footprint_m=40.0),
                 query=QueryConfig(footprint_m=40.0), cache_dir=str(tmp_path / "cache"), verify=False,
                 progress=lambda f, msg: seen.append((f, msg)))
    messages = [m for _, m in seen]
    assert messages[0] == "Loading model…" and messages[1].startswith("Embedding the photo")
    # each size searched around the 40 m given says which it is, then counts its tiles to "N of N"
    sizes = [m.split(":")[0] for m in messages if "Embedding tiles " in m]
    assert sizes and all(s.startswith("Footprint ") and s.endswith(" of 3)") for s in sizes)
    assert len(set(sizes)) == 3 and sum(a != b for a, b in zip(sizes, sizes[1:])) == 2  # one size after another
    tiles = [m.split(": ")[-1] for m in messages if "Embedding tiles " in m]
    assert tiles[-1].split()[2] == tiles[-1].split()[4]  # "Embedding tiles N of N" at the end
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_photo_of_the_bottom_right_corner_is_found_there(data_dir: Path, embedder, tmp_path: Path) -> None:
    """The regular steps end up to one step short of the right and bottom edges; the edge-aligned last
    column and row search that strip: a photo of the very corner is found at the corner, not a step away,
    and the heatmap is drawn to the raster's edges."""
    from PIL import Image

    raster = str(data_dir / "netherlands_aerial_0.25m_epsg28992.tif")  # 250 m: steps of 30 m end 10 m short
    info, fp = open_raster(raster), 60.0
    grid = make_grid(info, TilingConfig(footprint_m=fp))
    assert (grid.n_cols, grid.n_rows) == (grid.full_cols + 1, grid.full_rows + 1)
    x1, y1 = info.affine * (info.width, info.height)
    truth = (x1 - fp / 2, y1 + fp / 2)  # north-up: y grows northwards, the bottom edge is y1
    view = render_view(raster, ViewSpec(cx=truth[0], cy=truth[1], footprint_m=fp * 4 / 3))
    side = view.image.shape[0] * 3 // 4  # the centre fp x fp square of the 4:3 view
    h, w = view.image.shape[:2]
    square = view.image[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    photo = tmp_path / "corner.png"
    Image.fromarray(square).save(photo)
    res = locate_photo(raster, str(photo), str(tmp_path / "out"), query=QueryConfig(footprint_m=fp, top_k=3),
                       cache_dir=str(tmp_path / "cache"), embedder=embedder, verify=False)
    assert math.hypot(res.best.x - truth[0], res.best.y - truth[1]) < 5.0, (res.best.x - truth[0],
                                                                             res.best.y - truth[1])
    xs, ys = [p[0] for p in res.best.polygon], [p[1] for p in res.best.polygon]
    assert max(xs) == pytest.approx(x1, abs=0.01) and min(ys) == pytest.approx(y1, abs=0.01)
    with rasterio.open(res.heatmap_path) as hm:
        data = hm.read(1, masked=True)
        right, bottom = hm.transform * (hm.width, hm.height)
    assert right >= x1 and bottom <= y1  # the heatmap reaches the raster's edges ...
    assert data[-1, -1] is not np.ma.masked and data[-1, :].count() > 0 and data[:, -1].count() > 0  # ... with data

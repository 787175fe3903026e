"""The structure re-rank on real imagery of two years: NAIP North Dakota 2015 as the map, views rendered
from the 2020 NAIP of the same fields (other crops, another season), whose truth is known exactly.

Decoys are other places of the same map, so a pass means the edges of 2020 fit the edges of 2015 where
they belong and nowhere else; a view of the map's own year is the easy control.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from shapely.geometry import Polygon

from model_backend.cli import build_parser
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets.region import Region
from model_backend.learn.datasets.synth import make_views
from model_backend.locate.candidates import Candidate
from model_backend.locate.export import polygon_is_ccw, read_matches
from model_backend.locate.structure import (
    DEFAULT_STRUCTURE,
    Placement,
    StructureMatcher,
    edge_field,
    footprint_ring,
    scale_ladder,
    structure_rerank,
)

FP = 400.0
EAST = Region(0.6, 0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def naip(data_dir):
    paths = {y: data_dir / f"naip_northdakota_5m_{y}.tif" for y in (2015, 2020)}
    if not all(p.exists() for p in paths.values()):
        pytest.skip("NAIP rasters missing from tests/data")
    return {y: str(p) for y, p in paths.items()}


def _cand(rank: int, x: float, y: float) -> Candidate:
    return Candidate(rank=rank, score=0.5 - 0.01 * rank, x=x, y=y, lon=0.0, lat=0.0,
                     polygon=[(x - 1, y - 1), (x + 1, y - 1), (x + 1, y + 1), (x - 1, y + 1), (x - 1, y - 1)])


def _decoys(info, cx: float, cy: float, rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
    """n places of the map at least two footprints from (cx, cy), far enough inside to hold a footprint."""
    out: list[tuple[float, float]] = []
    x0, y1 = info.affine * (0, 0)
    x1, y0 = info.affine * (info.width, info.height)
    while len(out) < n:
        x, y = rng.uniform(x0 + FP, x1 - FP), rng.uniform(y0 + FP, y1 - FP)
        if math.hypot(x - cx, y - cy) > 2 * FP:
            out.append((x, y))
    return out


def test_edge_field_forgets_polarity_and_contrast():
    """A road darker or brighter than its verge is the same line; so is a faint copy of it."""
    rng = np.random.default_rng(0)
    grey = np.zeros((96, 96), np.uint8)
    grey[30:60, 10:80] = 180
    grey[70:75, :] = 90
    grey = np.clip(grey + rng.normal(0, 3, grey.shape), 0, 255).astype(np.uint8)
    z = edge_field(grey, 1.0, 6.0)
    assert np.allclose(edge_field(255 - grey, 1.0, 6.0), z, atol=1e-3)
    faint = edge_field((grey * 0.3).astype(np.uint8), 1.0, 6.0)
    strong = np.abs(z) > 0.5
    # the same orientation wherever there is an edge (doubled angle: phase), at a similar normalised strength
    assert np.median(np.abs(np.angle(faint[strong] * np.conj(z[strong])))) < 0.1
    assert 0.7 < np.median(np.abs(faint[strong])) / np.median(np.abs(z[strong])) < 1.4
    valid = np.ones_like(grey, bool)
    valid[:, :20] = False
    assert (edge_field(grey, 1.0, 6.0, valid)[:, :20] == 0).all()   # nothing at or beyond nodata's edge


def test_cross_year_views_are_placed_at_their_truth(naip):
    """2020 views on the 2015 map, each offered with its true place (a tile centre up to 0.3 footprint
    off) among four decoys: the true place comes first, moved to the photo's centre, at its heading."""
    info = open_raster(naip[2015])
    views = make_views(naip[2020], 6, FP, 7, margin_m=108, region=EAST)
    rng = np.random.default_rng(7)
    first, errors, heading_errors = 0, [], []
    for v in views:
        s = v.spec
        off = rng.uniform(-0.3, 0.3, 2) * FP
        places = [(s.cx + off[0], s.cy + off[1]), *_decoys(info, s.cx, s.cy, rng, 4)]
        order = rng.permutation(len(places))
        cands = [_cand(i + 1, *places[j]) for i, j in enumerate(order)]
        out, secs = structure_rerank(info, v.image, cands, FP * s.scale)
        assert [c.rank for c in out] == list(range(1, len(cands) + 1)) and secs > 0
        best = out[0]
        if math.hypot(best.tile_x - places[0][0], best.tile_y - places[0][1]) < 1e-6:
            first += 1
            errors.append(math.hypot(best.x - s.cx, best.y - s.cy) / (FP * s.scale))
            ring = Polygon(best.polygon)
            heading = math.degrees(math.atan2(*(np.array(best.polygon[3]) - np.array(best.polygon[0]))))
            # ring[3] - ring[0] (counter-clockwise from bottom-left) runs along the photo's left edge, up
            heading_errors.append(abs((heading - s.heading_deg + 180.0) % 360.0 - 180.0))
            assert ring.is_valid and polygon_is_ccw(best.polygon)
            assert ring.centroid.distance(Polygon(v.truth_polygon).centroid) < 0.5 * FP
        assert all(c.structure is not None for c in out)
    assert first >= 5, f"the true place came first for {first} of {len(views)} cross-year views"
    assert np.median(errors) < 0.15, errors
    assert np.median(heading_errors) < 15.0, heading_errors


def test_known_heading_narrows_the_search(naip):
    info = open_raster(naip[2015])
    v = make_views(naip[2015], 1, FP, 3, margin_m=108, region=EAST, max_tilt_deg=0.0, photometric=False)[0]
    with StructureMatcher(info, v.image, FP * v.spec.scale, yaw_deg=v.spec.heading_deg) as m:
        assert len(m.kinds) == 3 * len(m.scales) and len(m.scales) == 5   # 1.2 either way, 10 % steps
        p = m.place(v.spec.cx + 60.0, v.spec.cy - 60.0)
    assert p is not None and p.score > 0.3          # the map's own year: a strong fit
    assert math.hypot(p.x - v.spec.cx, p.y - v.spec.cy) < 0.1 * FP
    assert abs((p.heading_deg - v.spec.heading_deg + 180.0) % 360.0 - 180.0) <= DEFAULT_STRUCTURE.heading_spread_deg


def test_the_ladder_reaches_beyond_a_size_given_too_small():
    sizes = scale_ladder(1.3, 1.1, DEFAULT_STRUCTURE.upward)
    assert 1.0 in sizes and sizes[0] == pytest.approx(1 / 1.3, abs=1e-3) and sizes[-1] == pytest.approx(1.625, abs=1e-3)
    assert max(b / a for a, b in zip(sizes, sizes[1:])) <= 1.1 + 1e-3
    assert scale_ladder(1.2, 1.1) == tuple(sorted(scale_ladder(1.2, 1.1)))  # no size given: symmetric, as before
    assert scale_ladder(1.2, 1.1)[0] == pytest.approx(1 / 1.2, abs=1e-3) and scale_ladder(1.0, 1.1) == (1.0,)


def test_a_photo_larger_than_the_size_given_is_placed_at_its_own_size(naip):
    """The analyst guessed the footprint a third too small: the photo covers 1.45 x the size given. The
    re-rank as locate runs it (the given size's tolerance and `upward`) finds its place and its size."""
    info = open_raster(naip[2015])
    v = make_views(naip[2015], 1, FP, 13, margin_m=150, region=EAST, max_tilt_deg=0.0, photometric=False,
                   scale_range=(1.0, 1.0))[0]
    given = FP / 1.45
    rng = np.random.default_rng(3)
    places = [(v.spec.cx + 0.2 * FP, v.spec.cy - 0.1 * FP), *_decoys(info, v.spec.cx, v.spec.cy, rng, 3)]
    cands = [_cand(i + 1, *xy) for i, xy in enumerate(reversed(places))]  # the true place offered last
    out, _ = structure_rerank(info, v.image, cands, given, span=1.3, upward=DEFAULT_STRUCTURE.upward)
    best = out[0]
    assert best.tile_x == pytest.approx(places[0][0]) and best.structure is not None
    assert math.hypot(best.x - v.spec.cx, best.y - v.spec.cy) < 0.15 * FP
    short = math.sqrt(Polygon(best.polygon).area / (640 / 480))  # the ring's short side (UTM: metres)
    assert 0.9 * FP < short < 1.1 * FP, short


def test_a_candidate_off_the_raster_keeps_its_tile(naip):
    info = open_raster(naip[2015])
    v = make_views(naip[2015], 1, FP, 5, margin_m=108, region=EAST)[0]
    x1, _ = info.affine * (info.width, info.height)
    far = _cand(1, x1 + 50 * FP, v.spec.cy)              # far east of the raster: nothing to read
    near = _cand(2, v.spec.cx, v.spec.cy)
    out, _ = structure_rerank(info, v.image, [far, near], FP * v.spec.scale)
    assert out[0].tile_x == near.x and out[0].structure is not None
    assert out[1].x == far.x and out[1].structure is None and out[1].polygon == far.polygon


def test_footprint_ring_is_the_placed_photo():
    p = Placement(score=0.3, x=1000.0, y=2000.0, heading_deg=30.0, scale=1.1)
    ring = footprint_ring(p, 100.0, 4 / 3, 1.0, 1.0)
    poly = Polygon(ring)
    assert ring[0] == ring[-1] and len(ring) == 5 and polygon_is_ccw(ring)
    assert poly.centroid.x == pytest.approx(1000.0) and poly.centroid.y == pytest.approx(2000.0)
    assert poly.area == pytest.approx(110.0 * 110.0 * 4 / 3)
    sides = sorted(math.dist(a, b) for a, b in zip(ring, ring[1:]))
    assert sides == pytest.approx([110.0, 110.0, 110.0 * 4 / 3, 110.0 * 4 / 3])


def test_locate_reports_structure_and_can_skip_it(naip, tmp_path, embedder, cache_dir):
    from model_backend.core.config import QueryConfig
    from model_backend.learn.datasets.synth import save_view
    from model_backend.locate.pipeline import locate_photo

    v = make_views(naip[2020], 1, FP, 11, margin_m=108, region=EAST)[0]
    photo = tmp_path / "view.jpg"
    save_view(v, str(photo))
    query = QueryConfig(footprint_m=FP, footprint_tolerance=0.0)     # one size: one index to build
    res = locate_photo(naip[2015], str(photo), str(tmp_path / "on"), query=query, embedder=embedder,
                       cache_dir=str(cache_dir), verify=False)
    line = res.json_line()
    assert line["structure"] is not None and line["structure_seconds"] > 0
    feats = read_matches(res.geojson_path)
    assert feats[0]["properties"]["structure"] == pytest.approx(res.best.structure)
    assert json.dumps(line)   # plain JSON
    off = locate_photo(naip[2015], str(photo), str(tmp_path / "off"), query=replace(query, structure=False),
                       embedder=embedder, cache_dir=str(cache_dir), verify=False)
    assert all(c.structure is None for c in off.candidates) and "structure_seconds" not in off.extra
    assert build_parser().parse_args(["locate", "r.tif", "p.jpg", "--out", "o", "--no-structure"]).structure is False

"""Pseudo-labels: unlabelled photos placed by the current model where it is sure become training pairs.

Real parts: a 1.6 km crop of NAIP 2015, ImageNet MobileNetV2, drone views simulated from the same crop
(tilt, heading, scale, colour), so the truth of every photo is known.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from rasterio.windows import Window

from model_backend.bench.adapt import IMAGENET, unlabelled_photos
from model_backend.core.config import ModelConfig, QueryConfig, TilingConfig
from model_backend.core.errors import Cancelled
from model_backend.geo.raster import open_raster
from model_backend.learn.adapt.pseudo import PseudoConfig, pseudo_labels
from model_backend.learn.datasets.region import WHOLE
from model_backend.locate.pipeline import around, footprint_indexes
from model_backend.nn.embedder import EmbeddingModel

from .conftest import crop_to

FOOTPRINT = 300.0
WINDOW = Window(300, 200, 320, 320)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = Path(__file__).resolve().parents[1] / "data"
    root = tmp_path_factory.mktemp("pseudo")
    dst = crop_to(data / "naip_northdakota_5m_2015.tif", root / "map.tif", WINDOW)
    photos = unlabelled_photos(dst, 6, FOOTPRINT, 21, root / "pool", region=WHOLE)
    info = open_raster(str(dst))
    net = EmbeddingModel.load(str(IMAGENET), "cpu", runtime="torch")
    indexes = footprint_indexes(str(dst), around(FOOTPRINT, 0.3, info), tiling=TilingConfig(footprint_m=FOOTPRINT),
                                model=ModelConfig(runtime="torch"), embedder=net, cache_dir=str(root / "cache"))
    import json

    truth = json.loads((root / "pool" / "truth.json").read_text())
    return {"info": info, "photos": [str(p) for p in photos], "net": net, "indexes": indexes, "truth": truth,
            "root": root}


def test_sure_placements_become_labels_at_the_true_place(case: dict) -> None:
    bad = case["root"] / "not_a_photo.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    res = pseudo_labels(case["info"], [*case["photos"], str(bad)], case["net"], case["indexes"], FOOTPRINT,
                        query=QueryConfig(rotations=4))
    assert res.tried == 6  # the unreadable file is skipped, not fatal
    assert len(res.labels) >= 3, res.scores  # same-date photos: most are sure
    for lb in res.labels:
        cx, cy, side = case["truth"][lb.photo.name]
        assert math.hypot(lb.cx - cx, lb.cy - cy) <= 0.25 * side, (lb, case["truth"][lb.photo.name])
        assert 0.75 * side <= lb.side_m <= 1.3 * side
        assert lb.heading is not None and 0 <= lb.heading < 360 and lb.index < 0
        assert len(lb.ring) == 5 and lb.ring[0] == lb.ring[-1]
    # Nothing is trusted above an impossible bar; the budget bounds the work.
    strict = pseudo_labels(case["info"], case["photos"], case["net"], case["indexes"], FOOTPRINT,
                           replace(PseudoConfig(), min_structure=1.01, max_photos=2), query=QueryConfig(rotations=4))
    assert strict.tried == 2 and strict.labels == []
    assert pseudo_labels(case["info"], case["photos"], case["net"], case["indexes"], FOOTPRINT,
                         replace(PseudoConfig(), budget_s=0.0)).tried == 0


def test_cancel_stops_pseudo_labelling(case: dict) -> None:
    with pytest.raises(Cancelled):
        pseudo_labels(case["info"], case["photos"], case["net"], case["indexes"], FOOTPRINT, cancel=lambda: True)

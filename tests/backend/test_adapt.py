"""Few-shot adaptation: held-out figure, new version, bad input, cancel, CLI.

The improvement test uses a strongly shifted tiny case, kept small so a real adaptation — index,
training of the last block, new model, re-index — runs in seconds: a 1.6 km crop of NAIP 2015 as
the map, and drone views simulated from the same crop whose camera renders colours very
differently (channels swapped, strong per-channel gamma, blur). On the real cross-year benchmark
(model_backend.bench.adapt) the gain is noisier; see docs/adapt.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

from model_backend.bench.adapt import IMAGENET, camera_look, make_labelled_photos
from model_backend.core.errors import InputError
from model_backend.learn.adapt import AdaptConfig, ValidationFigure, adapt, split_holdout, unlabelled_pool
from model_backend.learn.adapt.pseudo import PseudoConfig
from model_backend.learn.adapt.train import TrainConfig
from model_backend.learn.labels import Label, LabelSet, read_labels, square_footprint, write_labels
from model_backend.learn.versions import ModelRegistry

from .conftest import crop_to

pytestmark = pytest.mark.slow
FOOTPRINT = 300.0
WINDOW = Window(300, 200, 320, 320)  # a 1.6 km square of the 5 m NAIP raster
SMALL_TRAIN = TrainConfig(views_per_pair=6, unlabelled_tiles=30, views_per_tile=2, styled_views_per_tile=2,
                          styled_per_step=16, steps_per_epoch=10, cdts_batch=16)
SMALL = AdaptConfig(epochs=3, holdout_count=16, rotations=4, runtime="torch", train=SMALL_TRAIN)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = Path(__file__).resolve().parents[1] / "data"
    root = tmp_path_factory.mktemp("adapt")
    map_ = crop_to(data / "naip_northdakota_5m_2015.tif", root / "map_2015.tif", WINDOW)
    labels = make_labelled_photos(map_, map_, 24, FOOTPRINT, 7, root / "photos", size=(320, 240), look=camera_look)
    return {"root": root, "map": str(map_), "labels": labels}


@pytest.fixture()
def data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CDIKT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_holdout_split_is_seeded_and_keeps_both_sides(case: dict) -> None:
    from model_backend.geo.raster import open_raster
    from model_backend.learn.labels import resolve_labels

    info = open_raster(case["map"])
    a = info.affine
    bounds = (a.c, a.f + a.e * info.height, a.c + a.a * info.width, a.f)
    labels = resolve_labels(read_labels(case["labels"]), info.crs_wkt, bounds)
    assert split_holdout(labels, AdaptConfig())[1] == []  # by default every pair trains and is evidence
    train, held = split_holdout(labels, AdaptConfig(seed=3, holdout=0.3))
    assert len(held) == round(0.3 * len(labels)) and len(train) + len(held) == len(labels)
    assert [lb.index for lb in held] == [lb.index for lb in split_holdout(labels, AdaptConfig(seed=3, holdout=0.3))[1]]
    assert len(split_holdout(labels[:3], AdaptConfig(holdout=0.9))[0]) == 2  # two stay to train and cross-fit
    with pytest.raises(InputError, match="at least 2 labelled pairs"):
        split_holdout(labels[:1], AdaptConfig())


def test_adaptation_improves_the_held_out_figure_and_writes_a_new_version(case: dict, tmp_path: Path,
                                                                          cache_dir: Path) -> None:
    out = tmp_path / "adapted.safetensors"
    registry = ModelRegistry(tmp_path / "data")
    res = adapt(case["map"], str(case["labels"]), str(out), str(IMAGENET), config=SMALL, cache_dir=str(cache_dir),
                registry=registry)
    ranks_before, ranks_after = np.array(res.before.ranks), np.array(res.after.ranks)
    assert res.n_train == 8 and res.after.n == 16
    # The true place moves up for the held-out photos: fewer misses at #1, a better mean rank.
    assert res.after.top1 > res.before.top1, (res.before.to_dict(), res.after.to_dict())
    assert ranks_after.mean() < ranks_before.mean()
    assert out.is_file() and "last" in res.trained_part
    assert res.look.look in ("colour", "luminance") and set(res.look.scores) == {"colour", "luminance"}
    (version,) = registry.versions()
    assert version.path == str(out) and version.parent is None and version.figures["after"]["top1"] == res.after.top1
    assert version.parent_path == str(IMAGENET)
    line = json.loads(res.json_line())
    assert line["before"]["ranks"] == list(ranks_before)
    # The keep-or-reject decision: each of the 8 training pairs ranked before and by a model that did not
    # train on it (cross-fitted), the rule applied to those ranks, its answer in the JSON.
    d = res.decision
    assert len(d.before) == len(d.after) == 8 and d.folds == 5 and line["decision"]["pairs"][0]["photo"]
    assert line["use"] == d.use == (sum(r == 1 for r in d.after) > sum(r == 1 for r in d.before)
                                    and d.better > d.worse)
    from model_backend.nn.embedder import EmbeddingModel

    net = EmbeddingModel.load(str(out), "cpu", runtime="torch")  # the engine loads the adapted model
    assert net.meta.architecture == "cdiktnet" and net.meta.dim == 1280


def test_bad_input_gives_one_line_and_loses_nothing(case: dict, tmp_path: Path, cache_dir: Path) -> None:
    labels = Path(case["labels"])
    original = labels.read_bytes()
    out = tmp_path / "new.safetensors"
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"a model the user keeps")
    with pytest.raises(InputError, match="never overwrites"):
        adapt(case["map"], str(labels), str(exists), config=SMALL, cache_dir=str(cache_dir))
    assert exists.read_bytes() == b"a model the user keeps"
    ls = read_labels(labels)
    empty = tmp_path / "empty.gpkg"
    write_labels(empty, LabelSet([], ls.crs_wkt, str(empty)))
    with pytest.raises(InputError, match="no labelled pairs"):
        adapt(case["map"], str(empty), str(out), config=SMALL, cache_dir=str(cache_dir))
    far = replace(ls, labels=[*ls.labels, Label(photo=ls.labels[0].photo, ring=square_footprint(
        0.0, 0.0, FOOTPRINT, 0.0, ls.crs_wkt))])
    with pytest.raises(InputError, match=r"Label 25 \(photo_000.jpg\) lies outside map_2015.tif"):
        adapt(case["map"], far, str(out), config=SMALL, cache_dir=str(cache_dir))
    bad_photo = tmp_path / "bad.jpg"
    bad_photo.write_bytes(b"\xff\xd8 truncated")
    broken = replace(ls, labels=[replace(ls.labels[0], photo=str(bad_photo)), *ls.labels[1:]])
    with pytest.raises(InputError, match="photo bad.jpg cannot be read"):
        adapt(case["map"], broken, str(out), config=SMALL, cache_dir=str(cache_dir))
    assert labels.read_bytes() == original and not out.exists()


def test_cancelled_adaptation_writes_nothing(case: dict, tmp_path: Path, cache_dir: Path) -> None:
    from model_backend.core.errors import Cancelled

    out = tmp_path / "cancelled.safetensors"
    seen: list[float] = []

    def cancel() -> bool:
        return len(seen) > 3  # after a few progress reports: mid-way through the first index/validation

    registry = ModelRegistry(tmp_path / "data")
    with pytest.raises(Cancelled, match="active model is unchanged"):
        adapt(case["map"], str(case["labels"]), str(out), config=SMALL, cache_dir=str(cache_dir), registry=registry,
              progress=lambda f, m: seen.append(f), cancel=cancel)
    assert not out.exists() and registry.versions() == []
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.iterdir())


def test_the_unlabelled_pool_is_the_rest_of_the_flight_without_the_labelled_photos(case: dict) -> None:
    from model_backend.geo.raster import open_raster
    from model_backend.learn.labels import resolve_labels

    info = open_raster(case["map"])
    a = info.affine
    labels = resolve_labels(read_labels(case["labels"]), info.crs_wkt,
                            (a.c, a.f + a.e * info.height, a.c + a.a * info.width, a.f))[:4]
    folder = labels[0].photo.parent
    given = [str(folder / "photo_010.jpg"), str(labels[0].photo)]  # one unlabelled, one labelled
    assert unlabelled_pool(labels, given, False) == [str(folder / "photo_010.jpg")]
    pool = unlabelled_pool(labels, given, True)
    assert len(pool) == 20 and len(set(pool)) == 20  # the folder's 24 photos less the 4 labelled, each once
    assert not {str(lb.photo) for lb in labels} & set(pool) and not any(p.endswith(".gpkg") for p in pool)


def test_validation_figure_summaries() -> None:
    fig = ValidationFigure([1, 3, 51, 1], 50)
    assert fig.top1 == 0.5 and fig.top5 == 0.75 and fig.median_rank == 2.0
    assert fig.better_or_equal(ValidationFigure([2, 1, 51, 4], 50))
    assert not ValidationFigure([2, 2], 50).better_or_equal(fig)


def test_cli_adapt_prints_before_and_after(case: dict, tmp_path: Path, cache_dir: Path, data_dir_env: Path,
                                           capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import model_backend.learn.adapt
    from model_backend.cli import main

    tiny = replace(SMALL_TRAIN, views_per_pair=2, unlabelled_tiles=8, styled_views_per_tile=1, steps_per_epoch=3)
    monkeypatch.setattr(model_backend.learn.adapt, "AdaptConfig", partial(
        AdaptConfig, runtime="torch", rotations=2, train=tiny, pseudo=PseudoConfig(max_photos=5)))  # the CLI's, tiny

    assert main(["adapt", "--raster", case["map"], "--labels", str(tmp_path / "missing.gpkg"),
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "Labels file not found" in capsys.readouterr().err
    geo = tmp_path / "labels.geojson"
    ls = read_labels(case["labels"])
    write_labels(geo, replace(ls, labels=[replace(lb, photo=str(ls.photo_path(lb))) for lb in ls.labels[:4]],
                              path=str(geo)))
    # The rest of the flight: by default the other 20 photos of the labelled photos' folder (5 tried, as set above).
    pool = [str(ls.photo_path(lb)) for lb in ls.labels[3:7]]
    rc = main(["adapt", "--raster", case["map"], "--labels", str(geo), "--out", str(tmp_path / "m.safetensors"),
               "--epochs", "1", "--cache-dir", str(cache_dir), "--look", "luminance", "--photos", *pool])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(doc["before"]) >= {"top1", "median_rank", "ranks"} and doc["after"]["n"] == 4  # every pair checked
    assert doc["n_train"] == 4 and doc["n_holdout"] == 0 and Path(doc["out"]).is_file()
    assert doc["pseudo_tried"] == 5 and 0 <= doc["pseudo_pairs"] <= 5
    assert len(doc["decision"]["pairs"]) == 4  # pseudo pairs train but are never evidence
    assert isinstance(doc["use"], bool) and doc["use"] == doc["decision"]["use"]
    assert [p["rank_after"] for p in doc["decision"]["pairs"]] == doc["after"]["ranks"]
    assert doc["look"] == "luminance" and "luminance only" in doc["trained_part"]
    from model_backend.learn.adapt import load_trainable
    from model_backend.learn.adapt.look import sees_luminance

    assert sees_luminance(load_trainable(doc["out"]))  # the written model ignores colour
    assert ModelRegistry().versions()[0].path == doc["out"]  # recorded in $CDIKT_DATA_DIR


def test_labels_that_teach_nothing_are_not_recommended(case: dict, tmp_path: Path, cache_dir: Path) -> None:
    """Every photo labelled at another photo's place: training on those pairs cannot help a photo it did
    not see find its (wrong) label, so the cross-fitted check must not recommend the model."""
    ls = read_labels(case["labels"])
    shuffled = [replace(lb, ring=ls.labels[(i + 3) % 8].ring) for i, lb in enumerate(ls.labels[:8])]
    labels = replace(ls, labels=shuffled)
    res = adapt(case["map"], labels, str(tmp_path / "wrong.safetensors"), str(IMAGENET),
                config=replace(SMALL, holdout_count=0), cache_dir=str(cache_dir))
    assert not res.use and not json.loads(res.json_line())["use"], res.decision.to_dict()
    assert res.after.n == 8  # without pairs kept out, the figures are the check's own


def test_a_fold_removes_every_view_of_its_pairs() -> None:
    import torch

    from model_backend.learn.adapt.crossfit import Decision, fold_of
    from model_backend.learn.adapt.train import AdaptViews

    pairs, per = 4, 3
    idx = np.arange(pairs * per).reshape(pairs, per)
    drone = torch.arange(pairs * per + 2, dtype=torch.float32)[:, None]  # 2 unlabelled photo views at the end
    sat = torch.arange(pairs * per + 5, dtype=torch.float32)[:, None]  # 5 unlabelled tile views
    views = AdaptViews(None, drone, sat, idx, idx.copy(), np.r_[np.repeat(np.arange(pairs), per), [-1, -1]],
                       np.r_[np.repeat(np.arange(pairs), per), [-1] * 5])  # type: ignore[arg-type]
    fold = views.without([1])
    assert fold.pair_drone.shape == (3, per) and len(fold.drone) == len(drone) - per and len(fold.sat) == len(sat) - per
    assert set(fold.drone_locations.tolist()) == {0, 1, 2, -1} and set(fold.sat_locations.tolist()) == {0, 1, 2, -1}
    # pair 2 of the original is pair 1 of the fold, with its own views
    assert fold.drone[fold.pair_drone[1]].flatten().tolist() == drone[idx[2]].flatten().tolist()
    assert (fold.drone_locations[fold.pair_drone[1]] == 1).all()
    f = fold_of(10, 0)
    assert sorted(np.bincount(f).tolist()) == [2, 2, 2, 2, 2] and (fold_of(10, 0) == f).all()
    assert Decision(["a", "b", "c"], [2, 1, 5], [1, 1, 3], 3, 100).use
    assert not Decision(["a", "b", "c"], [2, 1, 5], [1, 2, 3], 3, 100).use  # as many at #1: keep the current
    assert not Decision(["a", "b", "c", "d"], [2, 3, 4, 1], [1, 9, 9, 1], 3, 100).use  # more pairs got worse

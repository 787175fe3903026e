"""Dataset readers, generated layouts, few-shot split, batch sampler, paired augmentation, raster pairs.

Layouts are written from the real test rasters into tmp_path (tiny: a few locations, 96 px), so the
readers are tested on what the writers produce and on hand-made broken trees; nothing is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets import (
    AugmentConfig,
    ImageRecord,
    LocationBatchSampler,
    PairedDataset,
    PairTransform,
    RasterPairDataset,
    read_layout,
    render_pair,
    sample_locations,
    satellite_crop,
    split_paired,
    write_sues200_layout,
    write_university_layout,
)
from model_backend.learn.datasets.raster_pairs import crop_window
from model_backend.learn.datasets.synth import ViewSpec, render_view

RASTERS = ("manila_oam_0.10m.tif", "netherlands_aerial_0.25m_epsg28992.tif")
SIZE = 96


@pytest.fixture(scope="module")
def rasters(data_dir: Path) -> list[str]:
    return [str(data_dir / r) for r in RASTERS]


@pytest.fixture(scope="module")
def u1652(tmp_path_factory: pytest.TempPathFactory, rasters: list[str]) -> Path:
    return write_university_layout(rasters, tmp_path_factory.mktemp("u1652"), 6, 2, seed=3, size=SIZE,
                                   n_distractors=1)


@pytest.fixture(scope="module")
def sues(tmp_path_factory: pytest.TempPathFactory, rasters: list[str]) -> Path:
    return write_sues200_layout(rasters, tmp_path_factory.mktemp("sues"), 5, 1, seed=4, size=SIZE,
                                heights=(150, 300))


def test_university_layout_round_trip(u1652: Path) -> None:
    train, test = read_layout("university1652", u1652, "train"), read_layout("university1652", u1652, "test")
    assert {r.location for r in train["drone"]} == {r.location for r in train["satellite"]}
    assert len(train["drone"]) == 2 * len(train["satellite"]) == 6
    q = {r.location for r in test["query_drone"]}
    assert q == {r.location for r in test["query_satellite"]} and len(q) == 3
    assert not q & {r.location for r in train["drone"]}, "a location is in train and test"
    assert len({r.location for r in test["gallery_satellite"]} - q) == 1, "the distractor tile is missing"
    assert [Path(r.path).name for r in test["query_drone"]] == [Path(r.path).name for r in test["gallery_drone"]]
    assert {r.view for r in test["gallery_satellite"]} == {"satellite"} and Path(test["query_drone"][0].path).suffix \
        == ".jpeg"
    assert Image.open(test["query_drone"][0].path).size == (SIZE, SIZE)


def test_sues200_layout_round_trip(sues: Path) -> None:
    for h in (150, 300):
        train, test = read_layout("sues200", sues, "train", h), read_layout("sues200", sues, "test", h)
        assert {r.group for r in train["drone"]} == {str(h)}
        q = {r.location for r in test["query_drone"]}
        assert q == {r.location for r in test["query_satellite"]} and len(q) == 2
        every = q | {r.location for r in train["satellite"]}
        assert {r.location for r in test["gallery_satellite"]} == every == {r.location for r in test["gallery_drone"]}
    with pytest.raises(InputError, match="heights present: 150, 300"):
        read_layout("sues200", sues, "test", 200)


def _tree(root: Path, files: list[str], dirs: list[str] = ()) -> Path:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / f)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


U_OK = ["train/drone/0001/a.jpeg", "train/satellite/0001/0001.jpg", "test/query_drone/0002/a.jpeg",
        "test/gallery_drone/0002/a.jpeg", "test/query_satellite/0002/s.jpg", "test/gallery_satellite/0002/s.jpg"]


@pytest.mark.parametrize("layout, files, dirs, split, height, phrase", [
    ("university1652", [], [], "test", None, "not found"),
    ("university1652", U_OK, ["test/gallery_satellite/0003"], "test", None, "holds no images"),
    ("university1652", U_OK[:2] + ["train/drone/x.jpg"], [], "train", None, None),
    ("university1652", ["test/query_drone/0002/a.jpeg"], [], "train", None, "drone not found"),
    ("university1652", [f.replace("test/", "") for f in U_OK[2:]], [], "test", None, "point --data at its parent"),
    ("university1652", ["test/query_drone/a.jpeg"], [], "test", None, "but no location folders"),
    ("university1652", ["train/drone/0001/a.jpeg", "train/satellite/0009/s.jpg"], [], "train", None,
     "have no satellite image"),
    ("university1652", [f.replace("0002/s", "0005/s") for f in U_OK], [], "test", None, "appears in its gallery"),
    ("university1652", ["Training/150/drone/0001/a.jpg"], [], "test", None, "use --layout sues200"),
    ("university1652", U_OK, [], "test", 150, "SUES-200 only"),
    ("sues200", ["satellite-view/0001/0.png"], [], "test", 150, "raw SUES-200 release"),
    ("sues200", ["150/0001/0.jpg"], [], "test", 150, "height folders directly"),
    ("sues200", U_OK, [], "test", 150, "use --layout university1652"),
    ("sues200", ["Testing/150/query_drone/0001/0.jpg"], [], "test", None, "needs a flight height"),
    ("sues200", ["Testing/150/query_drone/0001/0.jpg"], [], "test", 120, "does not exist"),
    ("sues200", ["Training/150/drone/0001/0.jpg"], ["Training/150/satellite"], "train", 150, "no location folders"),
])
def test_bad_layouts(tmp_path: Path, layout, files, dirs, split, height, phrase) -> None:
    root = _tree(tmp_path / "d", files, dirs) if files or dirs else tmp_path / "missing"
    if phrase is None:   # a loose file beside location folders is ignored, not an error
        assert len(read_layout(layout, root, split, height)["drone"]) == 1
        return
    with pytest.raises(InputError, match=phrase) as err:
        read_layout(layout, root, split, height)
    assert "\n" not in str(err.value)


def _records(n_loc: int, n_drone: int, groups: tuple[str, ...] = ("",)) -> list[ImageRecord]:
    out = []
    for i in range(n_loc):
        g = groups[i % len(groups)]
        out += [ImageRecord(f"/d/{i:04d}/{k}.jpg", f"{i:04d}", "drone", g) for k in range(n_drone)]
        out.append(ImageRecord(f"/s/{i:04d}.jpg", f"{i:04d}", "satellite", g))
    return out


def test_split_by_location_is_seeded_stratified_and_complete() -> None:
    recs = _records(100, 5, groups=("a", "a", "a", "b", "b"))
    s = split_paired(recs, 0.1, seed=7, unit="location")
    assert s == split_paired(list(reversed(recs)), 0.1, seed=7, unit="location"), "depends on record order"
    assert s != split_paired(recs, 0.1, seed=8, unit="location")
    locs = {d.location for d, _ in s.paired}
    assert len(locs) == 10 and len(s.paired) == 50
    assert sorted(d.group for d, _ in s.paired[::5]) == ["a"] * 6 + ["b"] * 4, "not stratified by group"
    assert all(d.location == sat.location for d, sat in s.paired)
    assert len(s.unpaired_drone) == 450 and not locs & {r.location for r in s.unpaired_drone}
    assert len(s.unpaired_satellite) == 90 and not locs & {r.location for r in s.unpaired_satellite}
    assert len(split_paired(recs, 0.001, seed=0).paired) == 5, "at least one location must stay paired"


def test_split_by_pair_spreads_over_locations() -> None:
    recs = _records(100, 50)
    s = split_paired(recs, 0.02, seed=1, unit="pair")
    assert len(s.paired) == 100 and len({d.location for d, _ in s.paired}) == 100
    assert len(s.unpaired_drone) == 4900 and s.unpaired_satellite == []
    few = split_paired(recs, 0.005, seed=1, unit="pair")
    assert len(few.paired) == 25 == len({d.location for d, _ in few.paired})
    assert {d.location for d, _ in few.paired} != {d.location for d, _ in split_paired(recs, 0.005, 2, "pair").paired}
    assert len(few.unpaired_satellite) == 75
    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(fraction=0.1, unit="image")):
        with pytest.raises(InputError):
            split_paired(recs, seed=0, **{"unit": "location", **bad})


def test_location_batches_have_distinct_locations_and_cover_the_epoch() -> None:
    labels = [i % 7 for i in range(60)] + [0] * 5          # unbalanced: location 0 has 14 items
    sampler = LocationBatchSampler(labels, batch_size=4, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(labels)))
    assert all(len({labels[i] for i in b}) == len(b) for b in batches)
    assert batches == list(LocationBatchSampler(labels, batch_size=4, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(sampler) == len(list(sampler))
    assert all(len(b) == 4 for b in LocationBatchSampler(labels, 4, seed=3, drop_last=True))
    ranks = [list(LocationBatchSampler(labels, 4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_pair_transform_flips_both_views_and_turns_the_satellite() -> None:
    rng = np.random.default_rng(0)
    drone = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)          # 4:3-ish: centre-cropped to a square
    sat = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    quiet = dict(brightness=0, contrast=0, saturation=0, hue_deg=0, p_blur=0, p_sharpen=0, p_dropout=0, p_jpeg=0)
    flip = PairTransform(40, (0, 0, 0), (1, 1, 1), config=AugmentConfig(p_flip=1.0, rotate_satellite=False, **quiet))
    d, s = flip.augment(drone, sat, np.random.default_rng(1))
    assert np.array_equal(d, drone[:, 10:50][:, ::-1]) and np.array_equal(s, sat[:, ::-1])
    turn = PairTransform(40, (0, 0, 0), (1, 1, 1), config=AugmentConfig(p_flip=0.0, **quiet))
    seen = set()
    for k in range(40):
        d, s = turn.augment(drone, sat, np.random.default_rng(k))
        assert np.array_equal(d, drone[:, 10:50])
        seen.add(next(r for r in range(4) if np.array_equal(s, np.rot90(sat, r))))
    assert seen == {0, 1, 2, 3}
    full = PairTransform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dt, st = full(drone, sat, np.random.default_rng(5))
    assert dt.shape == st.shape == (3, 32, 32) and dt.dtype == torch.float32
    assert not torch.equal(dt, full(drone, sat, np.random.default_rng(6))[0])


def test_paired_dataset_batches_from_a_layout(u1652: Path) -> None:
    train = read_layout("university1652", u1652, "train")
    ds = PairedDataset(train["drone"], train["satellite"], PairTransform(64, (0.5,) * 3, (0.25,) * 3))
    assert len(ds) == 6 and sorted(set(ds.labels)) == [0, 1, 2]
    loader = DataLoader(ds, batch_sampler=LocationBatchSampler(ds.labels, batch_size=3, seed=0))
    d, s, lab = next(iter(loader))
    assert d.shape == s.shape == (3, 3, 64, 64) and len(set(lab.tolist())) == 3


def test_raster_pairs_are_aligned_and_deterministic(rasters: list[str]) -> None:
    locs = sample_locations(rasters, 4, 40.0, seed=11)
    assert locs == sample_locations(rasters, 4, 40.0, seed=11) and locs != sample_locations(rasters, 4, 40.0, seed=12)
    assert [loc.group for loc in locs] == ["manila_oam_0.10m"] * 2 + ["netherlands_aerial_0.25m_epsg28992"] * 2
    for loc in locs:
        pair = render_pair(loc, np.random.default_rng(loc.label), 64)
        spec = pair.drone_view.spec
        assert (spec.cx, spec.cy) == (loc.cx, loc.cy), "drone truth centre is not the crop centre"
        centre = pair.drone_view.image_to_crs @ np.array([32.0, 32.0, 1.0])
        assert np.allclose(centre[:2] / centre[2], (loc.cx, loc.cy), rtol=0, atol=1e-4)
        info = open_raster(loc.raster)
        win = crop_window(info, loc.cx, loc.cy, loc.footprint_m)
        mid = info.affine * (win.col_off + win.width / 2, win.row_off + win.height / 2)
        assert np.allclose(mid, (loc.cx, loc.cy), rtol=0, atol=1e-6), "the crop is not centred on the location"
        assert pair.satellite.shape == (64, 64, 3) and pair.drone_view.valid_fraction >= 0.98
    # Content, not only coordinates: a nadir, north-up, unjittered drone view is the satellite crop.
    loc = locs[0]
    view = render_view(loc.raster, ViewSpec(loc.cx, loc.cy, loc.footprint_m), size=(64, 64))
    sat, valid = satellite_crop(loc.raster, loc.cx, loc.cy, loc.footprint_m, 64)
    corr = np.corrcoef(view.image.mean(-1).ravel(), sat.mean(-1).ravel())[0, 1]
    assert valid == 1.0 and corr > 0.9, corr


def test_raster_pair_dataset_items(rasters: list[str]) -> None:
    locs = sample_locations(rasters[:1], 3, 40.0, seed=2, mode="grid", grid_step_m=50.0)
    ds = RasterPairDataset(locs, views_per_location=2, size=48, seed=5)
    assert len(ds) == 6 and ds.labels == [0, 0, 1, 1, 2, 2]
    d0, s0, lab = ds[3]
    assert lab == 1 and d0.shape == s0.shape == (48, 48, 3)
    assert np.array_equal(d0, ds[3][0]), "the same item of the same epoch must be the same view"
    ds.set_epoch(1)
    assert not np.array_equal(d0, ds[3][0]) and np.array_equal(s0, ds[3][1])
    split = split_paired(ds.records(), 0.34, seed=0)
    items = sorted(RasterPairDataset.item_of(d) for d, _ in split.paired)
    assert len(items) == 2 and items[1] == items[0] + 1
    with pytest.raises(InputError, match="smaller footprint"):
        sample_locations(rasters, 1, 500.0, seed=0)


def test_grey_augmentation_shows_luminance_only_and_is_off_by_default() -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    grey = PairTransform(32, (0.5,) * 3, (0.25,) * 3, config=AugmentConfig(p_grey=1.0, p_dropout=0.0))
    d, s = grey.augment(colour, colour, np.random.default_rng(1))
    assert (d[..., 0] == d[..., 1]).all() and (s[..., 1] == s[..., 2]).all()
    plain = PairTransform(32, (0.5,) * 3, (0.25,) * 3, config=AugmentConfig(p_dropout=0.0))
    d, _ = plain.augment(colour, colour, np.random.default_rng(1))
    assert not (d[..., 0] == d[..., 1]).all()
    from model_backend.learn.training import TrainConfig

    with pytest.raises(InputError, match="--grey is a probability"):
        TrainConfig(layout="raster", data=".", grey=1.5).validate()

"""Training CDIKTNet: each mode learns, a resumed run equals a straight one, bad input exits 2.

Tiny data keeps this on a CPU in seconds: University-1652- and SUES-200-layout datasets
simulated from the real test rasters (64 px, a dozen locations), MobileNetV2 from the default
ImageNet weights, a few optimizer steps. "Learns" is measured on held-aside drone views (views
of the training locations that training never sees) against the locations' satellite tiles:
after so few steps, gains on unseen *locations* are too small to test without flakiness.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model_backend.bench.evaluate import embed_images
from model_backend.bench.retrieval import evaluate_embeddings
from model_backend.bench.training import training_throughput
from model_backend.cli import main
from model_backend.core.errors import InputError
from model_backend.geo.raster import open_raster
from model_backend.learn.datasets import write_sues200_layout, write_university_layout
from model_backend.learn.training import TrainConfig, load_checkpoint, train
from model_backend.learn.training.data import raster_entries, raster_locations
from model_backend.learn.training.modes import initial_weights, write_inference
from model_backend.nn.embedder import EmbeddingModel

REPO = Path(__file__).resolve().parents[2]
RASTERS = ("manila_oam_0.10m.tif", "netherlands_aerial_0.25m_epsg28992.tif")
SIZE = 64
HELD = 2
"""Drone views per training location moved aside before training: the evaluation queries."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes and run
    several times slower; restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hold_views_aside(root: Path, train_dir: Path, n: int = HELD) -> Path:
    """Move the last `n` drone views of every training location to root/heldout/<id>/."""
    held = root / "heldout"
    for loc in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        for img in sorted(loc.iterdir())[-n:]:
            (held / loc.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(img), held / loc.name / img.name)
    return held


@pytest.fixture(scope="module")
def u1652(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    rasters = [str(data_dir / r) for r in RASTERS]
    root = write_university_layout(rasters, tmp_path_factory.mktemp("train_u1652"), 16, 4 + HELD, seed=1,
                                   footprint_m=20.0, size=SIZE, test_fraction=0.25)
    hold_views_aside(root, root / "train" / "drone")
    return root


@pytest.fixture(scope="module")
def sues(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    root = write_sues200_layout([str(data_dir / "manila_oam_0.10m.tif")], tmp_path_factory.mktemp("train_sues"),
                                12, 4 + HELD, seed=2, heights=(300,), footprint_m=20.0, size=SIZE, test_fraction=0.25)
    hold_views_aside(root, root / "Training" / "300" / "drone")
    return root


@pytest.fixture(scope="module")
def u1652_grey(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The cross-domain target: University-1652 layout, drone views from a monochrome camera.

    Eight training views per location (CDTS clusters them: DBSCAN wants at least four close
    neighbours) and four held aside; the drone views turned grey, the satellite tiles left in
    colour: a shift a colour-trained source model has not seen (its R@1 here is about ImageNet's),
    which CDTS has to bridge from the unpaired target images alone.
    """
    rasters = [str(data_dir / r) for r in RASTERS]
    root = write_university_layout(rasters, tmp_path_factory.mktemp("train_grey"), 16, 8 + 4, seed=9,
                                   footprint_m=20.0, size=SIZE, test_fraction=0.25)
    hold_views_aside(root, root / "train" / "drone", 4)
    for img in [*(root / "train" / "drone").glob("*/*"), *(root / "heldout").glob("*/*")]:
        rgb = np.asarray(Image.open(img).convert("RGB"), np.float32)
        Image.fromarray(np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)).save(img, quality=92)
    return root


def held_out_score(weights: str | Path, root: Path, sat_dir: Path) -> dict[str, float]:
    """R@1 (percent) and mean rank of the true tile for the held-aside views against the training tiles."""
    net = EmbeddingModel.load(str(weights), "cpu", runtime="torch")
    queries = sorted((root / "heldout").glob("*/*"))
    tiles = sorted(sat_dir.glob("*/*"))
    q, g = embed_images(net, [str(p) for p in queries]), embed_images(net, [str(p) for p in tiles])
    q_ids, g_ids = [p.parent.name for p in queries], np.array([p.parent.name for p in tiles])
    sims = q @ g.T
    ranks = [1 + int((s > s[g_ids == loc].max()).sum()) for s, loc in zip(sims, q_ids)]
    return {"R@1": evaluate_embeddings(q, q_ids, g, g_ids)["R@1"], "mean_rank": float(np.mean(ranks))}


def untrained(cfg: TrainConfig, path: Path) -> Path:
    """The model training starts from, saved as inference weights for the same input size."""
    name, state, _ = initial_weights(cfg)
    from model_backend.nn.cdiktnet import CDIKTNet

    return write_inference(CDIKTNet(name, 0, pretrained_state=state), path, SIZE)


def tiny(tmp: Path, **kw) -> TrainConfig:
    base = {"out": str(tmp / "m.safetensors"), "input_size": SIZE, "batch_size": 8, "checkpoint_every": 1000,
            "workers": 0, "log_every": 1000, "lr": 1e-3, "backbone_lr_scale": 1.0}
    return TrainConfig(**{**base, **kw})


def loss_drop(history: list[dict[str, float]], stage: int) -> tuple[float, float]:
    losses = [h["loss"] for h in history if h["stage"] == stage]
    k = max(1, len(losses) // 3)
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def assert_learned(before: dict[str, float], after: dict[str, float]) -> None:
    assert after["R@1"] > before["R@1"], (before, after)
    assert after["mean_rank"] < before["mean_rank"], (before, after)


def test_supervised_learns(u1652: Path, tmp_path: Path) -> None:
    cfg = tiny(tmp_path, layout="university1652", data=str(u1652), mode="supervised", steps=12)
    result = train(cfg)
    first, last = loss_drop(result.history, 0)
    assert result.steps == 12 and last < first
    sat = u1652 / "train" / "satellite"
    assert_learned(held_out_score(untrained(cfg, tmp_path / "init.safetensors"), u1652, sat),
                   held_out_score(cfg.out, u1652, sat))


def test_mixed_precision_path_trains(u1652: Path, tmp_path: Path) -> None:
    """The AMP code path (autocast + the same optimizer step) on CPU bf16: what a GPU run goes through,
    minus fp16's loss scaler. Finite, falling loss and a model that loads."""
    cfg = tiny(tmp_path, layout="university1652", data=str(u1652), mode="supervised", steps=6, amp="bf16")
    result = train(cfg)
    losses = [h["loss"] for h in result.history]
    assert result.steps == 6 and all(np.isfinite(losses))
    first, last = loss_drop(result.history, 0)
    assert last < first
    emb = EmbeddingModel.load(cfg.out, "cpu", runtime="torch").embed(torch.zeros(1, 3, SIZE, SIZE))
    assert np.isclose(np.linalg.norm(emb), 1.0, atol=1e-3)


def test_fewshot_learns_from_few_pairs_then_unpaired_images(u1652: Path, tmp_path: Path) -> None:
    """CDIS on the paired half, then CDTS on everything; CDTS must change the model CDIS left.

    The CDTS loss of 8 iterations on re-clustered pseudo-labels is no trend (its clusters change
    each epoch), so the check is against the same run stopped after CDIS: training is seeded, so
    both runs share the CDIS stage exactly and any difference in the weights is CDTS's doing.
    """
    common = {"layout": "university1652", "data": str(u1652), "mode": "fewshot", "paired_fraction": 0.5,
              "steps": 12, "cdts_iters": 4, "cdts_k1": 4}
    cdis_only = tiny(tmp_path / "cdis", **common, cdts_epochs=0)
    cdis_result = train(cdis_only)
    cfg = tiny(tmp_path, **common, cdts_epochs=2)
    result = train(cfg)
    stages = [h["stage"] for h in result.history]
    assert stages.count(0) == 12 and stages.count(1) == 8  # CDIS on the paired part, then CDTS
    first, last = loss_drop(result.history, 0)
    assert last < first
    assert [h["loss"] for h in result.history if h["stage"] == 0] == [h["loss"] for h in cdis_result.history]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    before, after = load_file(cdis_only.out), load_file(cfg.out)
    moved = max(float((after[k] - before[k]).norm() / (before[k].norm() + 1e-12))
                for k in before if before[k].is_floating_point())
    assert moved > 1e-3, moved  # CDTS trained: a do-nothing stage would leave the weights as they were
    sat = u1652 / "train" / "satellite"
    assert_learned(held_out_score(untrained(cfg, tmp_path / "init.safetensors"), u1652, sat),
                   held_out_score(cfg.out, u1652, sat))


def test_crossdomain_adapts_a_model_trained_elsewhere(sues: Path, u1652_grey: Path, tmp_path: Path) -> None:
    """A SUES-200-layout model (colour, Manila) adapted to University-1652-layout grey drone views
    without any pair: CDTS raises R@1 and lowers the mean rank over both its starting point and
    the untrained (ImageNet) model, on drone views of the target that training never saw.

    The source trains its last three blocks only (`freeze_blocks`, as small data should): trained
    whole on nine places it falls below ImageNet on the grey target. CDTS settings fit 96 drone
    views of 12 places: shared space from the first epoch (the source already aligns the views),
    k1 near the 8 views a place has, P x K = 4 x 4 per view. Measured on 17 dataset/training
    seed pairs: CDTS beat its start in all, the ImageNet model in 15 (2 ties); a tiny run's path
    is chaotic, though (another thread count moves R@1 by up to 8 points), so the dataset seed
    here (9) is one whose margins over both stayed 4+ queries of 48 with 1 and 2 threads.
    """
    source = tiny(tmp_path, layout="sues200", data=str(sues), height=300, mode="supervised", steps=8,
                  backbone_lr_scale=0.1, freeze_blocks=16, out=str(tmp_path / "source.safetensors"))
    train(source)
    cfg = tiny(tmp_path, layout="university1652", data=str(u1652_grey), mode="crossdomain", init=source.out,
               batch_size=16, cdts_epochs=4, cdts_iters=4, cdts_k1=8, cdts_lr_scale=0.2, shared_from_epoch=0,
               out=str(tmp_path / "adapted.safetensors"))
    result = train(cfg)
    assert [h["stage"] for h in result.history] == [1] * 16
    first, last = loss_drop(result.history, 1)
    assert last < first
    sat = u1652_grey / "train" / "satellite"
    imagenet = held_out_score(untrained(source, tmp_path / "init.safetensors"), u1652_grey, sat)
    start, adapted = held_out_score(source.out, u1652_grey, sat), held_out_score(cfg.out, u1652_grey, sat)
    assert_learned(start, adapted)
    assert_learned(imagenet, adapted)


def test_resume_is_exact(u1652: Path, tmp_path: Path) -> None:
    common = {"layout": "university1652", "data": str(u1652), "mode": "supervised", "steps": 4, "batch_size": 4,
              "checkpoint_every": 2, "backbone_lr_scale": 0.1}
    straight = tiny(tmp_path / "a", **common)
    train(straight)
    first = tiny(tmp_path / "b", **common, stop_after=2)
    assert train(first).stopped
    assert load_checkpoint(first.checkpoint_path)["state"]["step"] == 2
    resumed = train(tiny(tmp_path / "b", **common, resume=str(first.checkpoint_path)))
    assert resumed.steps == 4 and not resumed.stopped
    a, b = load_file(straight.out), load_file(first.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_a = load_checkpoint(straight.checkpoint_path)["model"]
    full_b = load_checkpoint(first.checkpoint_path)["model"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)  # heads too, not only the backbone


def test_resume_refuses_other_settings(u1652: Path, tmp_path: Path) -> None:
    cfg = tiny(tmp_path, layout="university1652", data=str(u1652), mode="supervised", steps=2, batch_size=4,
               stop_after=1)
    train(cfg)
    with pytest.raises(Exception, match="batch_size"):
        train(tiny(tmp_path, layout="university1652", data=str(u1652), mode="supervised", steps=2, batch_size=6,
                   resume=str(cfg.checkpoint_path)))


def test_raster_list_shares_labels_of_coregistered_rasters(data_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "rasters.txt"
    colorado = data_dir / "colorado_hro_0.15m_nodata.tif"
    listing.write_text(f"# two years of one place (here: the same file twice)\n{colorado} 12\n{colorado}  12  # again\n"
                       f"{data_dir / 'manila_oam_0.10m.tif'}\n")
    entries = raster_entries(listing, 60.0)
    assert [e.footprint_m for e in entries] == [12.0, 12.0, 60.0]
    locs = raster_locations(entries, seed=0)
    twice = [loc for loc in locs if "colorado" in loc.group]
    assert twice and len({loc.label for loc in twice}) * 2 == len(twice)  # each place once per "year"
    assert sorted({loc.label for loc in locs}) == list(range(len({loc.label for loc in locs})))


def test_supervised_on_a_raster(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny(tmp_path, layout="raster", data=str(data_dir / "manila_oam_0.10m.tif"), mode="supervised", steps=2,
               batch_size=4, footprint_m=30.0, locations=6, views_per_location=2)
    result = train(cfg)
    assert result.steps == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    net = EmbeddingModel.load(cfg.out, "cpu", runtime="torch")
    assert net.meta.architecture == "cdiktnet" and net.meta.input_size == SIZE


def test_training_throughput_is_measured() -> None:
    res = training_throughput(steps=2, batch_size=2, size=64)
    assert res["batch_pairs"] == 2 and res["steps"] == 2 and res["threads"] >= 1
    assert res["step_s"] > 0  # rounded to the millisecond: a step cannot take no time
    # the figure is pairs x 2 views per step time (the rounding of step_s allows a few percent)
    assert res["images_per_s"] == pytest.approx(2 * 2 / res["step_s"], rel=0.05)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_backend", "train", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ})


def test_train_cli_end_to_end(u1652: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.safetensors"
    proc = run_cli("--layout", "university1652", "--data", u1652, "--mode", "supervised", "--steps", 2,
                   "--batch-size", 4, "--input-size", SIZE, "--out", out, "--workers", 0, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["out"] == str(out) and Path(summary["checkpoint"]).is_file()
    assert "cdis" in proc.stderr and "img/s" in proc.stderr  # the progress line
    net = EmbeddingModel.load(str(out), "cpu", runtime="torch")
    emb = net.embed(net.normalise(np.zeros((1, SIZE, SIZE, 3), np.uint8)))
    assert emb.shape == (1, 1280) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4


@pytest.mark.parametrize(("args", "phrase"), [
    (["--layout", "university1652", "--data", "/nonexistent/u1652", "--mode", "supervised"], "not found"),
    (["--layout", "kitti", "--data", ".", "--mode", "supervised"], "unknown layout"),
    (["--layout", "university1652", "--data", ".", "--mode", "fewshot", "--paired-fraction", "1.5"], "(0, 1]"),
    (["--layout", "university1652", "--data", ".", "--mode", "fewshot", "--paired-fraction", "0"], "(0, 1]"),
    (["--layout", "university1652", "--data", ".", "--mode", "crossdomain"], "--init"),
    (["--layout", "university1652", "--data", ".", "--mode", "unsupervised"], "unknown mode"),
])
def test_bad_input_exits_2_before_torch(args: list[str], phrase: str, tmp_path: Path) -> None:
    proc = run_cli(*args, "--out", tmp_path / "m.safetensors", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and phrase.lower() in lines[0].lower(), lines[0]


def test_bad_layouts_exit_2(u1652: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong layout for the folder, an empty location folder: one line, status 2 (in-process: torch is loaded)."""
    broken = tmp_path / "broken"
    shutil.copytree(u1652 / "train", broken / "train")
    (broken / "train" / "drone" / "9999").mkdir()
    cases = [(["--layout", "sues200", "--height", "300", "--data", str(u1652)], "university-1652 layout"),
             (["--layout", "university1652", "--data", str(broken)], "holds no images")]
    for args, phrase in cases:
        assert main(["train", *args, "--mode", "supervised", "--out", str(tmp_path / "m.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0].lower(), err


def test_default_weights_prefer_the_shipped_cdiktnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model_backend.nn.weights as model

    monkeypatch.setattr(model, "resources_dir", lambda: tmp_path)
    assert model.default_weights_path() == model.imagenet_weights_path() == tmp_path / "weights" / \
        model.DEFAULT_WEIGHTS_NAME
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model.DEFAULT_MODEL_NAME).write_bytes(b"")
    assert model.default_weights_path() == tmp_path / "models" / model.DEFAULT_MODEL_NAME


def test_raster_list_region_trains_on_part_of_a_raster(data_dir: Path, tmp_path: Path) -> None:
    """`region=` keeps every location's margin square (all a drone view sees) in that part of the raster."""
    naip = data_dir / "naip_northdakota_5m_2015.tif"
    listing = tmp_path / "rasters.txt"
    listing.write_text(f"{naip} 400 region=0,0,0.6,1\n{naip} region=0.6,0,1,1 300\n")
    west, east = raster_entries(listing, None)
    assert (west.footprint_m, west.region.x1, east.footprint_m, east.region.x0) == (400.0, 0.6, 300.0, 0.6)
    info = open_raster(str(naip))
    cut = (info.affine * (0.6 * info.width, 0.0))[0]
    locs = raster_locations([west], seed=0)
    assert len(locs) > 20 and all(loc.cx + 0.8 * 400.0 <= cut + 5.0 for loc in locs)
    listing.write_text(f"{naip} 400 region=0,0,1.5,1\n")
    with pytest.raises(InputError, match=r"rasters.txt:1: Region"):
        raster_entries(listing, None)

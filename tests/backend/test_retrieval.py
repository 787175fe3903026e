"""Benchmark metrics (hand-worked and against a loop transcription of the benchmark's rule), the
`evaluate` command end to end, and the SUES-200 real-photo check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_backend import cli
from model_backend.bench.evaluate import SUES_PHOTOS, sues200_sample_retrieval
from model_backend.bench.retrieval import evaluate_embeddings, metrics_from_similarity, per_query
from model_backend.core.errors import InputError
from model_backend.learn.datasets import random_crops, write_university_layout

REPO = Path(__file__).resolve().parents[2]


def test_hand_worked_example() -> None:
    """Three queries, five gallery items with ids [A, B, A, C, B] (g0..g4).

    q1 (A) ranks g1 g0 g3 g2 g4 -> true matches (A) at 0-based ranks 1 and 3, ngood = 2.
        i=0, r=1: precision 1/2, previous 0/1 = 0 -> (0 + 1/2)/2 = 1/4
        i=1, r=3: precision 2/4, previous 1/3     -> (1/3 + 1/2)/2 = 5/12
        AP = (1/4 + 5/12) / 2 = 1/3.   First hit at rank 1: not in the top 1, in the top 5.
    q2 (B) ranks g4 g1 ...   -> matches at ranks 0 and 1: both terms (1 + 1)/2 = 1 -> AP = 1; top 1.
    q3 (C) ranks g0 g1 g2 g4 g3 -> one match at rank 4: precision 1/5, previous 0/4 -> AP = 1/10;
        in the top 5 only.
    R@1 = 1/3 = 33.33 %, R@5 = R@10 = 100 % (R@10 > gallery size saturates),
    AP = (1/3 + 1 + 1/10) / 3 = 43/90 = 47.78 %.
    (Plain, non-trapezoid AP would give q1 (1/2 + 2/4)/2 = 1/2: the benchmark's form is the one above.)
    """
    g_ids = ["A", "B", "A", "C", "B"]
    q_ids = ["A", "B", "C"]
    scores = np.array([[0.8, 0.9, 0.3, 0.5, 0.1],
                       [0.3, 0.8, 0.2, 0.1, 0.9],
                       [0.9, 0.8, 0.7, 0.5, 0.6]])
    first, ap = per_query(scores, q_ids, g_ids)
    assert first.tolist() == [1, 0, 4]
    assert np.allclose(ap, [1 / 3, 1.0, 0.1])
    # As embeddings: unit gallery vectors e_j, so a query's scores are its feature row.
    m = evaluate_embeddings(scores, q_ids, np.eye(5), g_ids)
    assert m == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "AP": 4300 / 90})
    assert metrics_from_similarity(scores, q_ids, g_ids) == pytest.approx(m)


def _benchmark_rule(scores: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray) -> tuple[np.ndarray, float]:
    """The University-1652 evaluation, query by query with loops (CMC curve, trapezoid AP)."""
    cmc = np.zeros(len(g_ids))
    ap_sum = 0.0
    for s, q in zip(scores, q_ids):
        order = np.argsort(-s, kind="stable")
        good_rows = [r for r, j in enumerate(order) if g_ids[j] == q]
        if not good_rows:
            continue
        cmc[good_rows[0]:] += 1
        for i, r in enumerate(good_rows):
            old = 1.0 if r == 0 else i / r
            ap_sum += ((i + 1) / (r + 1) + old) / 2 / len(good_rows)
    return cmc / len(q_ids) * 100, ap_sum / len(q_ids) * 100


def test_matches_the_benchmark_rule_on_random_data() -> None:
    rng = np.random.default_rng(0)
    g_ids = rng.integers(0, 12, 60)
    q_ids = np.concatenate([rng.integers(0, 12, 40), [99]])        # one query without any true match
    q, g = rng.normal(size=(41, 16)), rng.normal(size=(60, 16))
    m = evaluate_embeddings(q, q_ids, g, g_ids, ks=(1, 5, 10, 60), chunk=7)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    cmc, ap = _benchmark_rule(qn @ gn.T, q_ids, g_ids)
    assert [m[f"R@{k}"] for k in (1, 5, 10, 60)] == pytest.approx([cmc[0], cmc[4], cmc[9], cmc[59]])
    assert m["AP"] == pytest.approx(ap) and m["R@60"] < 100.0, "the unmatched query must count as a miss"


def test_bad_feature_shapes() -> None:
    with pytest.raises(InputError, match="same dimension"):
        evaluate_embeddings(np.ones((2, 3)), [0, 1], np.ones((2, 4)), [0, 1])
    with pytest.raises(InputError, match="one location id"):
        evaluate_embeddings(np.ones((2, 3)), [0], np.ones((2, 3)), [0, 1])
    with pytest.raises(InputError, match="at least one"):
        evaluate_embeddings(np.ones((0, 3)), [], np.ones((2, 3)), [0, 1])


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    rasters = [str(data_dir / r) for r in ("manila_oam_0.10m.tif", "netherlands_aerial_0.25m_epsg28992.tif")]
    return write_university_layout(rasters, tmp_path_factory.mktemp("eval"), 6, 2, seed=5, size=128, n_distractors=2)


def test_evaluate_command_end_to_end(layout: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "model_backend", "evaluate", "--layout", "university1652",
                           "--data", str(layout), "--device", "cpu", "--batch-size", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"drone_to_satellite", "satellite_to_drone"}
    for direction in out.values():
        assert set(direction) == {"R@1", "R@5", "R@10", "AP"}
        assert all(0.0 <= v <= 100.0 for v in direction.values())
        assert direction["R@1"] <= direction["R@5"] <= direction["R@10"]
    # 3 test locations among 5 satellite tiles, 2 views each: even ImageNet features beat chance (20 %).
    assert out["drone_to_satellite"]["R@1"] > 20.0


@pytest.mark.parametrize("args, phrase", [
    (["--layout", "university1652", "--data", "{missing}"], "not found"),
    (["--layout", "sues200", "--data", "{layout}", "--height", "150"], "use --layout university1652"),
    (["--layout", "sues200", "--data", "{layout}", "--height", "175"], "does not exist"),
    (["--layout", "university1652", "--data", "{layout}", "--height", "150"], "SUES-200 only"),
    (["--layout", "cvusa", "--data", "{layout}"], "unknown layout"),
    (["--layout", "university1652", "--data", "{layout}/test"], "its parent"),
    (["--layout", "university1652", "--data", "{layout}", "--batch-size", "0"], "from 1 to"),
    (["--layout", "university1652", "--data", "{layout}", "--weights", "{missing}"], "weights file not found"),
])
def test_evaluate_bad_input_exits_2_with_one_line(layout: Path, tmp_path: Path, capsys, args, phrase) -> None:
    argv = [a.format(layout=layout, missing=tmp_path / "nope") for a in args]
    assert cli.main(["evaluate", *argv]) == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert err.out == "" and len(lines) == 1 and lines[0].startswith("error: ")
    assert phrase.lower() in lines[0].lower(), lines[0]


def test_sues200_sample_retrieval(embedder, data_dir: Path) -> None:
    assert len(list(SUES_PHOTOS.glob("*-*.jpg"))) == 12 and (SUES_PHOTOS / "s0.png").is_file()
    tiles = random_crops([str(data_dir / "manila_oam_0.10m.tif")], 4, (80.0, 150.0), 128, seed=0)
    assert len(tiles) == 4 and tiles[0].shape == (128, 128, 3)
    res = sues200_sample_retrieval(embedder, tiles, batch_size=16)
    assert res["gallery_size"] == 5 and res["photos"] == 12
    assert sorted(res["per_height"]) == ["150", "200", "250", "300"]
    assert all(1 <= r <= 5 for r in res["all"]["ranks"]) and len(res["all"]["ranks"]) == 12
    assert res["all"]["mean_rank"] == pytest.approx(np.mean(res["all"]["ranks"]), abs=0.01)
    with pytest.raises(InputError, match="not found"):
        sues200_sample_retrieval(embedder, tiles, photos_dir=data_dir)

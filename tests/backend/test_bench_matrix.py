"""The adaptation matrix's arithmetic and its resume: the figures the floors are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_backend.bench.adapt_matrix import PAIRS, read_log, run_matrix, stats, summarise


def _run(m: int, p: int, seed: int, factor: float, before: float, after: float, use: bool) -> dict:
    return {"matrix_map_year": m, "matrix_photo_year": p, "adapt_seed": seed, "adapt_footprint_factor": factor,
            "adapt_top1_before": before, "adapt_top1_after": after, "adapt_use": use, "adapt_wall_s": 150.0}


def test_stats_give_mean_minimum_and_an_interval_around_the_mean() -> None:
    s = stats([0.1, 0.2, 0.3, 0.4])
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.25) and s["min"] == 0.1 and s["max"] == 0.4
    lo, hi = s["ci95"]
    assert 0.1 <= lo < 0.25 < hi <= 0.4
    assert stats([0.5] * 5)["ci95"] == [0.5, 0.5]
    assert stats([])["mean"] is None


def test_the_model_in_use_is_the_adapted_one_only_when_recommended_and_harm_is_counted() -> None:
    runs = [_run(2015, 2020, 0, 1.0, 0.20, 0.40, True),    # used, better
            _run(2015, 2020, 1, 1.0, 0.30, 0.10, False),   # rejected: the current model stays in use
            _run(2010, 2020, 0, 1.0, 0.30, 0.25, True),    # used and worse: the floor's failure
            _run(2015, 2020, 0, 1.3, 0.10, 0.20, True)]
    s = summarise(runs)
    one = s["x1"]
    assert one["runs"] == 3 and one["used"] == 2 and one["activated_worse"] == 1
    assert one["activated_worse_runs"] == ["2010<-2020 seed 0"]
    assert one["in_use"]["mean"] == pytest.approx((0.40 + 0.30 + 0.25) / 3, abs=1e-4)
    assert one["before"]["min"] == 0.20 and one["after"]["max"] == 0.40
    assert one["per_pair"]["map2015_photos2020"] == {"before_mean": 0.25, "in_use_mean": 0.35, "used": 1, "runs": 2}
    assert s["x1.3"]["runs"] == 1


def test_an_interrupted_matrix_resumes_from_its_log(tmp_path: Path) -> None:
    """Each finished run is one line of the log; a rerun takes them from there (a torn last line, from a
    kill mid-write, is ignored) and runs only what is missing - here nothing, so no adaptation starts."""
    log = tmp_path / "matrix.jsonl"
    lines = [json.dumps(_run(m, p, 0, 1.0, 0.2, 0.3, True)) for m, p in PAIRS]
    log.write_text("\n".join(lines) + '\n{"matrix_map_year": 20')
    assert len(read_log(log)) == len(PAIRS)
    said: list[str] = []
    out = run_matrix(seeds=[0], factors=[1.0], log=log, say=said.append, n_pool=0)  # logged without a pool
    assert out["adapt_matrix_runs"] == 6 and out["adapt_matrix_before_mean"] == pytest.approx(0.2)
    assert out["adapt_matrix_in_use_mean"] == pytest.approx(0.3) and out["adapt_matrix_activated_worse"] == 0
    assert not any("seed 0 footprint" in m for m in said)  # no run was redone


def test_flight_figures_pool_flights_and_count_the_gain() -> None:
    from model_backend.bench.flight import summarise as flight_summary

    runs = [{"n": 10, "track_hits": 9, "alone_hits": 4, "track_errors_m": [1.0] * 9 + [900.0],
             "alone_errors_m": [1.0] * 4 + [800.0] * 6, "decode_ms_per_photo": 2.0, "seconds_per_photo": 0.5},
            {"n": 20, "track_hits": 20, "alone_hits": 14, "track_errors_m": [2.0] * 20,
             "alone_errors_m": [2.0] * 14 + [700.0] * 6, "decode_ms_per_photo": 4.0, "seconds_per_photo": 0.7}]
    s = flight_summary(runs)
    assert s["n"] == 30 and s["track_top1"] == pytest.approx(29 / 30, abs=1e-4)
    assert s["alone_top1"] == pytest.approx(0.6)
    assert s["gain_points"] == pytest.approx(36.7) and s["per_flight_track_minus_alone"] == [5, 6]
    assert s["track_median_error_m"] == 2.0 and s["decode_ms_per_photo_max"] == 4.0
    lo, hi = s["track_ci95"]
    assert lo < 29 / 30 < hi <= 1.0

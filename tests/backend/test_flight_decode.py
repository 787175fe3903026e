"""The flight decoder on tracks with known truth: decoys, outliers, gaps and a GPS prior."""

from __future__ import annotations

import time

import numpy as np
import pytest

from model_backend.core.errors import InputError
from model_backend.locate.flight.decode import DecodeConfig, Observation, decode

FOOT = 100.0


def track(n: int, seed: int, *, k: int = 10, true_rank_z: float = 2.0, decoy_z: float = 3.0,
          p_true_not_first: float = 0.6, dt: float = 3.0, speed: float = 12.0):
    """A straight-then-turning flight; each photo's true place is one of k candidates, often not the best."""
    rng = np.random.default_rng(seed)
    heading = np.cumsum(rng.normal(0, 0.15, n))
    xy = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * speed * dt, axis=0)
    obs, truth = [], []
    for t in range(n):
        xs = rng.uniform(-3000, 3000, k)
        ys = rng.uniform(-3000, 3000, k)
        z = rng.uniform(0, decoy_z, k)
        j = int(rng.integers(k))
        xs[j], ys[j] = xy[t] + rng.normal(0, 10, 2)
        z[j] = true_rank_z if rng.random() < p_true_not_first else decoy_z + 1
        obs.append(Observation(xs, ys, z, FOOT, time_s=t * dt))
        truth.append(j)
    return obs, truth, xy


def test_decoding_finds_the_track_that_single_photos_miss() -> None:
    obs, truth, _ = track(60, seed=1)
    alone = np.mean([int(np.argmax(o.z)) == j for o, j in zip(obs, truth)])
    d = decode(obs)
    together = np.mean([c == j for c, j in zip(d.choice, truth)])
    assert alone < 0.5 and together >= 0.95, (alone, together)
    assert all(0.0 <= c <= 1.0 for c in d.confidence)
    assert all(p.sum() <= 1.0 + 1e-9 for p in d.posterior)


def test_a_photo_far_from_its_neighbours_is_an_outlier_not_forced() -> None:
    obs, truth, _ = track(30, seed=2, p_true_not_first=0.0)
    o = obs[15]
    obs[15] = Observation(o.xs + 20000.0, o.ys, o.z, FOOT, time_s=o.time_s)  # no candidate near the track
    d = decode(obs)
    assert d.choice[15] == -1 and d.confidence[15] > 0.5
    assert [c for t, c in enumerate(d.choice) if t != 15] == [j for t, j in enumerate(truth) if t != 15]


def test_a_gap_in_time_widens_the_reach() -> None:
    obs, truth, xy = track(20, seed=3, p_true_not_first=0.0, speed=15.0)
    del obs[8:12]
    del truth[8:12]
    assert decode(obs).choice == truth, "a 15 s gap at 15 m/s must not make the next photos unreachable"
    no_time = [Observation(o.xs, o.ys, o.z, o.footprint_m) for o in obs]
    assert np.mean([c == j for c, j in zip(decode(no_time, DecodeConfig(default_interval_s=3.0)).choice, truth)]) > 0.8


def test_gps_prior_picks_among_equally_good_candidates() -> None:
    a = Observation([0.0, 1000.0], [0.0, 0.0], [1.0, 1.0], FOOT, gps_xy=(990.0, 5.0))
    assert decode([a]).choice == [1]
    assert decode([Observation([0.0, 1000.0], [0.0, 0.0], [1.0, 1.0], FOOT, gps_xy=(10.0, 0.0))]).choice == [0]


def test_bad_settings_and_inputs_say_so() -> None:
    with pytest.raises(InputError, match="positive"):
        DecodeConfig(max_speed_m_s=0.0)
    with pytest.raises(InputError, match="at least one candidate"):
        Observation([], [], [], FOOT)
    assert decode([]).choice == []


def test_decoding_costs_well_under_10_ms_per_photo() -> None:
    obs, truth, _ = track(500, seed=4, k=20)
    t0 = time.perf_counter()
    d = decode(obs)
    per_photo = (time.perf_counter() - t0) / len(obs)
    assert per_photo < 0.010, per_photo
    assert np.mean([c == j for c, j in zip(d.choice, truth)]) > 0.9

"""Adaptation figures that can be trusted: every ordered pair of the three NAIP years, several seeds,
and the footprint given right (x1.0) and a third too large (x1.3).

One adaptation (`bench.adapt.adapt_benchmark`) per (map year, photo year, seed, footprint factor):
10 labelled photos train, 40 unlabelled photos of the same flight are handed to it (`POOL`), 100 others
are located before and after through the production path, and the keep-or-reject decision is recorded.
Per footprint factor the summary gives, over all runs, the mean, the minimum and a 95 % bootstrap
interval of the mean of top-1:
- `before`: the starting model;
- `after`: the adapted model, whether or not it was recommended;
- `in_use`: what the analyst ends up with (the adapted model only when recommended);
and how many runs activated a model that was worse on the 100 photos (the floor: none).

Sixty adaptations take about 6 hours on 2 CPU cores (~350 s each with the pool of 40 photos). With `log`,
each finished run is appended to a JSON-lines file as it ends and a rerun skips the runs already there,
so an interrupted matrix resumes.

The starting model is ImageNet MobileNetV2, as in the adapt part: the shipped default was trained on
these three NAIP rasters, so its figures here would be measured on its own training data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.bench.adapt import IMAGENET, NAIP, adapt_benchmark

YEARS = tuple(sorted(NAIP))
PAIRS = tuple((m, p) for m in YEARS for p in YEARS if m != p)
"""(map year, photo year): all six ordered pairs."""
FACTORS = (1.0, 1.3)
SEEDS = (0, 1, 2, 3, 4)
FOOTPRINT_M = 400.0
MARGIN_M = round(FOOTPRINT_M * 1.2 * (max(FACTORS) - 1.0) * 0.75)
"""Views are kept this far inside the raster at every factor, so a label drawn x1.3 (of a view up to 1.2x
the nominal size, at any heading) still lies on it, and every factor sees the same photos."""
POOL = 40
"""Unlabelled photos of the flight handed to each adaptation (as the dock hands it the labelled photos'
folders): the pseudo pairs (`learn.adapt.pseudo`) come from them."""
FLOOR_BEFORE = 0.45
FLOOR_AFTER = 0.70

Say = Callable[[str], None]


def _key(r: dict[str, Any]) -> tuple[int, int, int, float]:
    return (int(r["matrix_map_year"]), int(r["matrix_photo_year"]), int(r["adapt_seed"]),
            float(r["adapt_footprint_factor"]))


def read_log(path: Path | None) -> dict[tuple[int, int, int, float], dict[str, Any]]:
    """The runs a previous (interrupted) matrix finished; a torn last line is ignored."""
    done: dict[tuple[int, int, int, float], dict[str, Any]] = {}
    if path is None or not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            done[_key(r)] = r
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def stats(values: Iterable[float], seed: int = 0, resamples: int = 10000) -> dict[str, Any]:
    """Mean, minimum, maximum and a 95 % percentile-bootstrap interval of the mean (no normality assumed)."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "min": None, "max": None, "ci95": None}
    means = np.random.default_rng(seed).choice(a, size=(resamples, a.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n": int(a.size), "mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4),
            "max": round(float(a.max()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The matrix's figures per footprint factor (see the module's docstring)."""
    out: dict[str, Any] = {}
    for factor in sorted({float(r["adapt_footprint_factor"]) for r in runs}):
        rs = [r for r in runs if float(r["adapt_footprint_factor"]) == factor and "adapt_top1_after" in r]
        before = [r["adapt_top1_before"] for r in rs]
        after = [r["adapt_top1_after"] for r in rs]
        in_use = [a if r["adapt_use"] else b for r, a, b in zip(rs, after, before)]
        worse = [f"{r['matrix_map_year']}<-{r['matrix_photo_year']} seed {r['adapt_seed']}" for r in rs
                 if r["adapt_use"] and r["adapt_top1_after"] < r["adapt_top1_before"]]
        per_pair = {}
        for m, p in PAIRS:
            pr = [r for r in rs if (r["matrix_map_year"], r["matrix_photo_year"]) == (m, p)]
            if pr:
                per_pair[f"map{m}_photos{p}"] = {
                    "before_mean": round(float(np.mean([r["adapt_top1_before"] for r in pr])), 4),
                    "in_use_mean": round(float(np.mean([r["adapt_top1_after"] if r["adapt_use"]
                                                        else r["adapt_top1_before"] for r in pr])), 4),
                    "used": sum(bool(r["adapt_use"]) for r in pr), "runs": len(pr)}
        out[f"x{factor:g}"] = {
            "runs": len(rs), "before": stats(before), "after": stats(after), "in_use": stats(in_use),
            "gain_points_if_used": stats(100 * (np.asarray(after) - np.asarray(before))),
            "used": sum(bool(r["adapt_use"]) for r in rs), "activated_worse": len(worse),
            "activated_worse_runs": worse, "wall_s": stats([r["adapt_wall_s"] for r in rs]),
            "per_pair": per_pair}
    return out


def run_matrix(*, seeds: Iterable[int] = SEEDS, factors: Iterable[float] = FACTORS,
               pairs: Iterable[tuple[int, int]] = PAIRS, log: Path | None = None, say: Say = print,
               weights: str | None = str(IMAGENET), n_test: int = 100, n_pool: int = POOL) -> dict[str, Any]:
    """Run (or resume, with `log`) the matrix; returns the summary and the runs. A logged run made with
    another pool size is run again."""
    done = read_log(log)
    runs: list[dict[str, Any]] = []
    todo = [(f, m, p, s) for f in factors for m, p in pairs for s in seeds]
    for i, (factor, m, p, seed) in enumerate(todo):
        key = (m, p, seed, float(factor))
        if key in done and done[key].get("adapt_pool", 0) == n_pool:
            runs.append(done[key])
            continue
        r = adapt_benchmark(case="cross-year", seed=seed, year=p, map_year=m, footprint_factor=factor,
                            weights=weights, n_test=n_test, footprint_m=FOOTPRINT_M, margin_m=MARGIN_M,
                            n_pool=n_pool)
        if "adapt_skipped" in r:
            say(f"matrix   skipped: {r['adapt_skipped']}")
            return {"adapt_matrix_skipped": r["adapt_skipped"]}
        r.update(matrix_map_year=m, matrix_photo_year=p)
        runs.append(r)
        if log is not None:
            _append(log, r)
        say(f"matrix   {i + 1:2d}/{len(todo)} map {m} photos {p} seed {seed} footprint x{factor:g}: top-1 "
            f"{r['adapt_top1_before']:.0%} -> {r['adapt_top1_after']:.0%}, "
            f"{'used' if r['adapt_use'] else 'kept the current model'} ({r['adapt_wall_s']:.0f} s)")
    summary = summarise(runs)
    for factor, s in summary.items():
        b, u = s["before"], s["in_use"]
        say(f"matrix   footprint {factor}: {s['runs']} runs; top-1 before {b['mean']:.1%} (min {b['min']:.0%}, 95 % "
            f"{b['ci95'][0]:.1%}-{b['ci95'][1]:.1%}), in use after {u['mean']:.1%} (min {u['min']:.0%}, 95 % "
            f"{u['ci95'][0]:.1%}-{u['ci95'][1]:.1%}); used {s['used']}, activated and worse {s['activated_worse']}; "
            f"adapt {s['wall_s']['max']:.0f} s at most")
    one = summary.get("x1", {})
    return {
        "adapt_matrix": summary, "adapt_matrix_runs": len(runs),
        "adapt_matrix_before_mean": (one.get("before") or {}).get("mean"),
        "adapt_matrix_in_use_mean": (one.get("in_use") or {}).get("mean"),
        "adapt_matrix_activated_worse": sum(s["activated_worse"] for s in summary.values()),
        "adapt_matrix_wall_max_s": max((s["wall_s"]["max"] for s in summary.values() if s["wall_s"]["max"]),
                                       default=None),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m model_backend.bench.adapt_matrix", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default %(default)s)")
    ap.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS),
                    help="footprint given as multiples of the true one (default %(default)s)")
    ap.add_argument("--pairs", default="all", help="map:photo year pairs, e.g. 2015:2020,2010:2020 (default all six)")
    ap.add_argument("--log", type=Path, help="JSON-lines file of finished runs: appended to, and resumed from")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--pool", type=int, default=POOL, help="unlabelled photos of the flight (default %(default)s)")
    args = ap.parse_args(argv)
    pairs = PAIRS if args.pairs == "all" else tuple(tuple(int(y) for y in p.split(":")) for p in args.pairs.split(","))
    out = run_matrix(seeds=[int(s) for s in args.seeds.split(",")], factors=[float(f) for f in args.factors.split(",")],
                     pairs=pairs, log=args.log, n_test=args.n_test, n_pool=args.pool,  # type: ignore[arg-type]
                     say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Other years, unadapted: top-1 over all six ordered pairs of the three NAIP years, with and without the
structure re-rank, in one run.

Each run simulates `n_views` drone views (tilt, heading, scale, colour; `learn.datasets.synth`) from the
photos' year, drawn whole from the eastern 40 % of the area (`bench.adapt.HELD_OUT_REGION`), and locates
them on the map's year through the production query path (`bench.localisation.synthetic_localisation`:
the footprint search around the size given, then `locate.pipeline.rerank_by_structure`). Each view gives
two answers, the embedding's first candidate and the re-ranked first one, so the difference is paired.
A view is found when the best candidate lies within one true footprint of the truth.

The model is ImageNet MobileNetV2 by default: the shipped CDIKTNet default was trained on all three NAIP
years (east included), so for it these views are not held out (`--cross-year-model default` measures it
anyway). The view seeds (300 + seed) are not the ones the re-rank was developed on (100, 101, 102).
Figures: per (pair, seed) top-1, then mean, minimum and a 95 % bootstrap interval over the runs, per pair
means, and the re-rank's seconds per view.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.bench.adapt import HELD_OUT_REGION, IMAGENET, NAIP
from model_backend.bench.adapt_matrix import stats
from model_backend.bench.localisation import synthetic_localisation
from model_backend.core.config import QueryConfig
from model_backend.nn.embedder import EmbeddingModel

PAIRS = tuple((m, p) for m in sorted(NAIP) for p in sorted(NAIP) if m != p)
"""(map year, photos' year): all six ordered pairs."""
FOOTPRINT_M = 400.0
MARGIN_M = 108.0
"""Views stay this far inside the region, as the adaptation benchmark's do."""
VIEW_SEED = 300
FLOOR_TOP1 = 0.45


def cross_year_benchmark(say: Any, *, seeds: Iterable[int] = (0, 1, 2), n_views: int = 20,
                         factors: Iterable[float] = (1.0, 1.3, 0.75), weights: str | None = str(IMAGENET),
                         tmp: Path | None = None) -> dict[str, Any]:
    """The figures of the module's docstring; keys `cross_year_*` (x1.0 unprefixed by factor)."""
    if not all(p.exists() for p in NAIP.values()):
        return {"cross_year_skipped": "missing NAIP rasters in tests/data"}
    net = EmbeddingModel.load(weights, "cpu")
    cache = str((tmp or Path(tempfile.mkdtemp(prefix="cdikt-cross-year-"))) / "cache_cross_year")
    out: dict[str, Any] = {"cross_year_model": Path(weights).name if weights else "default",
                           "cross_year_views_per_run": n_views}
    seeds, factors = list(seeds), tuple(factors)
    for factor in factors:
        runs = []
        for m, p in PAIRS:
            for seed in seeds:
                rep = synthetic_localisation(str(NAIP[p]), n_views, FOOTPRINT_M, VIEW_SEED + seed, embedder=net,
                                             cache_dir=cache, query=QueryConfig(), map_raster=str(NAIP[m]),
                                             given_factor=factor, region=HELD_OUT_REGION, margin_m=MARGIN_M)
                runs.append({"map": m, "photos": p, "seed": seed, "top1": rep.hit1,
                             "top1_embedding": rep.hit1_embedding, "structure_s": rep.structure_s})
                say(f"cross-year x{factor:g} map {m} <- photos {p} seed {seed}: top1 {rep.hit1:6.1%} "
                    f"(embedding alone {rep.hit1_embedding:6.1%}), re-rank {rep.structure_s:.2f} s/view")
        key = "cross_year" if factor == 1.0 else f"cross_year_x{factor:g}"
        after, before = [r["top1"] for r in runs], [r["top1_embedding"] for r in runs]
        out[f"{key}_top1"] = stats(after)
        out[f"{key}_top1_embedding"] = stats(before)
        out[f"{key}_gain_points"] = stats(100 * (np.asarray(after) - np.asarray(before)))
        out[f"{key}_top1_mean"] = out[f"{key}_top1"]["mean"]
        out[f"{key}_per_pair"] = {
            f"map{m}_photos{p}": {"top1_mean": round(float(np.mean([r["top1"] for r in rs])), 4),
                                  "top1_embedding_mean": round(float(np.mean([r["top1_embedding"] for r in rs])), 4)}
            for m, p in PAIRS if (rs := [r for r in runs if (r["map"], r["photos"]) == (m, p)])}
        out[f"{key}_structure_s_per_view"] = round(float(np.mean([r["structure_s"] for r in runs])), 3)
        t, e = out[f"{key}_top1"], out[f"{key}_top1_embedding"]
        say(f"cross-year x{factor:g}: top1 {t['mean']:.1%} (95 % {t['ci95'][0]:.0%}-{t['ci95'][1]:.0%}, min "
            f"{t['min']:.0%}; {len(runs)} runs of {n_views} views) vs embedding alone {e['mean']:.1%} "
            f"(95 % {e['ci95'][0]:.0%}-{e['ci95'][1]:.0%}); floor >= {FLOOR_TOP1:.0%}")
    for factor in factors:
        key = f"cross_year_x{factor:g}"
        if factor != 1.0 and f"{key}_top1_mean" in out and out.get("cross_year_top1_mean"):
            out[f"{key}_ratio"] = round(out[f"{key}_top1_mean"] / out["cross_year_top1_mean"], 3)
    return out

#!/usr/bin/env python3
"""Compare models on every held-out check before one ships as the default.

Usage: .venv/bin/python scripts/compare_default.py CANDIDATE.safetensors [OTHER.safetensors ...]
       [--views 60] [--cross-year-views 100] [--json OUT]

Every model given is compared with the ImageNet MobileNetV2 on the same data, in one run:
- Semi-synthetic localisation (`bench.localisation.synthetic_localisation`, seed 11, 60 views) on
  the three rasters no default is trained on: manila 40 m, netherlands 50 m, bali 50 m.
- Cross-year, unadapted: the 6 ordered pairs of the NAIP years (photos of one year located on the
  map of another), 400 m, photos from the eastern 40 % only (`bench.adapt.HELD_OUT_REGION`: the
  default trains on the west), the adaptation matrix's photos of seed 0 (seed 100).
- University-1652 and SUES-200 layouts written from the three held-out rasters
  (`write_university_layout`, `write_sues200_layout`, seeded) and scored by `evaluate_layout`:
  drone -> satellite and satellite -> drone R@1 / AP.
- The 12 real SUES-200 photos (`evaluate.sues200_sample_retrieval`) against their satellite tile
  among 99 distractor tiles (`random_crops` of every raster, 80-150 m, 256 px, seed 0).
Hit rates come with 95 % Wilson intervals. Prints one JSON object; resources/models/README.md
reports its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_backend.bench.adapt import HELD_OUT_REGION, NAIP
from model_backend.bench.evaluate import evaluate_layout, sues200_sample_retrieval
from model_backend.bench.footprint import wilson
from model_backend.bench.localisation import synthetic_localisation
from model_backend.learn.datasets import random_crops, write_sues200_layout, write_university_layout
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.weights import imagenet_weights_path

HELD_OUT = (("manila_oam_0.10m.tif", 40.0), ("netherlands_aerial_0.25m_epsg28992.tif", 50.0),
            ("bali_pix4d_0.35m_alpha.tif", 50.0))
YEAR_PAIRS = [(p, m) for m in (2010, 2015, 2020) for p in (2010, 2015, 2020) if p != m]
CROSS_YEAR_M = 400.0
SUES_HEIGHTS = (150, 300)


def raster_dir() -> Path:
    shared = REPO.parent / "shared" / "data" / "rasters"
    return shared if shared.is_dir() else REPO / "tests" / "data"


def write_layouts(root: Path) -> dict[str, Path]:
    """The two benchmark layouts, simulated from the held-out rasters (same seed: same images for every model)."""
    rasters = [str(raster_dir() / name) for name, _ in HELD_OUT]
    return {
        "university1652": write_university_layout(rasters, root / "u1652", 30, 6, seed=3, footprint_m=25.0,
                                                  test_fraction=0.5, n_distractors=6),
        "sues200": write_sues200_layout(rasters, root / "sues200", 30, 6, seed=3, footprint_m=25.0,
                                        heights=SUES_HEIGHTS, test_fraction=0.5),
    }


def evaluate(weights: str, views: int, cross_views: int, distractors: list, layouts: dict[str, Path]) -> dict:
    net = EmbeddingModel.load(weights, "cpu", runtime="torch")
    out: dict = {"weights": Path(weights).name, "sha256": net.sha256[:12], "synthetic": {}, "cross_year": {}}
    with tempfile.TemporaryDirectory() as cache:
        for name, fp in HELD_OUT:
            t = time.perf_counter()
            rep = synthetic_localisation(str(raster_dir() / name), views, fp, 11, embedder=net, cache_dir=cache)
            out["synthetic"][name] = {**rep.to_dict(), "seconds": round(time.perf_counter() - t, 1)}
        if cross_views:
            for p, m in YEAR_PAIRS:
                rep = synthetic_localisation(str(NAIP[p]), cross_views, CROSS_YEAR_M, 100, embedder=net,
                                             cache_dir=cache, map_raster=str(NAIP[m]), margin_m=108.0,
                                             region=HELD_OUT_REGION)
                hits = round(rep.hit1 * rep.n)
                out["cross_year"][f"{p}_on_{m}"] = {"top1": round(rep.hit1, 4), "top5": round(rep.hit5, 4),
                                                     "ci95": [round(v, 3) for v in wilson(hits, rep.n)], "n": rep.n}
    top1 = [r["top1"] for r in out["synthetic"].values()]
    out["synthetic_top1_mean"] = round(sum(top1) / len(top1), 4)
    if out["cross_year"]:
        cy = [r["top1"] for r in out["cross_year"].values()]
        out["cross_year_top1_mean"] = round(sum(cy) / len(cy), 4)
        out["cross_year_top1_min"] = min(cy)
    out["university1652"] = evaluate_layout("university1652", layouts["university1652"], embedder=net)
    out["sues200_layout"] = {str(h): evaluate_layout("sues200", layouts["sues200"], height=h, embedder=net)
                             for h in SUES_HEIGHTS}
    out["sues200_real_photos"] = sues200_sample_retrieval(net, distractors)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="weights files; the first is the candidate")
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--cross-year-views", type=int, default=100, help="per year pair; 0 skips the cross-year check")
    ap.add_argument("--json")
    args = ap.parse_args()
    rasters = sorted(str(p) for p in raster_dir().glob("*.tif"))
    distractors = random_crops(rasters, 99, (80.0, 150.0), 256, seed=0)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        layouts = write_layouts(Path(tmp))
        for label, weights in [("imagenet", str(imagenet_weights_path()))] + [(Path(m).name, m) for m in args.models]:
            t = time.perf_counter()
            result[label] = evaluate(weights, args.views, args.cross_year_views, distractors, layouts)
            result[label]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"{label}: synthetic {result[label]['synthetic_top1_mean']:.1%}, cross-year "
                  f"{result[label].get('cross_year_top1_mean', float('nan')):.1%}", file=sys.stderr, flush=True)
    cand = result[Path(args.models[0]).name]
    result["candidate_at_least_as_good"] = cand["synthetic_top1_mean"] >= result["imagenet"]["synthetic_top1_mean"]
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

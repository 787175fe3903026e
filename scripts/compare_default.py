#!/usr/bin/env python3
"""Compare a trained model with the ImageNet MobileNetV2 default on the held-out checks.

Usage: .venv/bin/python scripts/compare_default.py CANDIDATE.safetensors [--views 60] [--json OUT]

- Semi-synthetic localisation (`evaluation.synthetic_localisation`, seed 11, 60 views) on the three
  rasters the default model never saw in training: manila 40 m, netherlands 50 m, bali 50 m.
- The 12 real SUES-200 photos (`evaluate.sues200_sample_retrieval`) against their satellite tile
  among 99 distractor tiles: `random_crops` of every raster in ../shared/data/rasters (tests/data
  when absent), 80-150 m, 256 px, seed 0.
Prints one JSON object; resources/models/README.md reports its numbers.
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

from model_backend.bench.evaluate import sues200_sample_retrieval
from model_backend.bench.localisation import synthetic_localisation
from model_backend.learn.datasets import random_crops
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.weights import imagenet_weights_path

HELD_OUT = (("manila_oam_0.10m.tif", 40.0), ("netherlands_aerial_0.25m_epsg28992.tif", 50.0),
            ("bali_pix4d_0.35m_alpha.tif", 50.0))


def raster_dir() -> Path:
    shared = REPO.parent / "shared" / "data" / "rasters"
    return shared if shared.is_dir() else REPO / "tests" / "data"


def evaluate(weights: str, views: int, distractors: list) -> dict:
    net = EmbeddingModel.load(weights, "cpu", runtime="torch")
    out: dict = {"weights": Path(weights).name, "sha256": net.sha256[:12], "synthetic": {}}
    with tempfile.TemporaryDirectory() as cache:
        for name, fp in HELD_OUT:
            t = time.perf_counter()
            rep = synthetic_localisation(str(raster_dir() / name), views, fp, 11, embedder=net, cache_dir=cache)
            out["synthetic"][name] = {**rep.to_dict(), "seconds": round(time.perf_counter() - t, 1)}
    top1 = [r["top1"] for r in out["synthetic"].values()]
    out["synthetic_top1_mean"] = round(sum(top1) / len(top1), 4)
    out["sues200"] = sues200_sample_retrieval(net, distractors)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("candidate")
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    rasters = sorted(str(p) for p in raster_dir().glob("*.tif"))
    distractors = random_crops(rasters, 99, (80.0, 150.0), 256, seed=0)
    result = {"imagenet": evaluate(str(imagenet_weights_path()), args.views, distractors),
              "candidate": evaluate(args.candidate, args.views, distractors)}
    result["candidate_at_least_as_good"] = (result["candidate"]["synthetic_top1_mean"]
                                            >= result["imagenet"]["synthetic_top1_mean"])
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `evaluate` command: benchmark retrieval of a model on University-1652 or SUES-200.

Images are prepared as at inference (centre square, resized to the model's input size with
antialiasing, the model's own normalisation) and embedded once each: University-1652's query and
gallery drone folders hold the same files, so embeddings are shared by path. Decoding runs in a
small thread pool one batch ahead of the model, since on a CPU JPEG decoding costs about as much
as a small network.

Also here: `sues200_sample_retrieval`, the check reported in the README on the 12 real SUES-200
drone photos of one building and its satellite tile hidden among distractor tiles.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from model_backend.bench.retrieval import evaluate_embeddings
from model_backend.core.errors import InputError
from model_backend.core.paths import test_data_dir
from model_backend.learn.datasets import read_layout
from model_backend.learn.datasets.common import ImageRecord
from model_backend.learn.datasets.transforms import load_rgb, to_model_input

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
SUES_PHOTOS = test_data_dir() / "sues200"
"""The 12 SUES-200 drone photos ({150,200,250,300}-{0,1,2}.jpg) and their satellite tile s0.png."""


def _prepare(path: str, size: int) -> np.ndarray:
    return to_model_input(load_rgb(path), size)


def embed_images(embedder, images: Sequence[str] | Sequence[np.ndarray], batch_size: int = 32,
                 progress: ProgressFn | None = None) -> np.ndarray:
    """(N, dim) unit vectors of image files or uint8 arrays, prepared at the embedder's input size."""
    size = int(embedder.meta.input_size)
    n = len(images)
    if n == 0:
        return np.zeros((0, int(embedder.meta.dim)), np.float32)
    out: list[np.ndarray] = []
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(s: int):
            return [pool.submit(_prepare, x, size) if isinstance(x, (str, Path))
                    else pool.submit(to_model_input, x, size) for x in images[s:s + batch_size]]

        pending = submit(0)
        for s in range(0, n, batch_size):
            batch = np.stack([f.result() for f in pending])
            pending = submit(s + batch_size) if s + batch_size < n else []
            out.append(embedder.embed(embedder.normalise(batch)))
            if progress:
                progress(min(1.0, (s + len(batch)) / n), f"embedded {s + len(batch)}/{n} images")
    return np.concatenate(out).astype(np.float32)


def evaluate_layout(layout: str, data: str | Path, *, weights: str | None = None, height: int | None = None,
                    batch_size: int = 32, device: str = "auto", embedder=None,
                    progress: ProgressFn | None = None) -> dict[str, dict[str, float]]:
    """{"drone_to_satellite": {...}, "satellite_to_drone": {...}} with R@1/5/10 and AP in percent."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}.")
    sets = read_layout(layout, data, "test", height)   # layout errors before the model loads
    if embedder is None:
        from model_backend.nn.embedder import EmbeddingModel

        embedder = EmbeddingModel.load(weights, device)
    paths = sorted({r.path for recs in sets.values() for r in recs})
    log.info("%s: %s", layout, ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    feats = embed_images(embedder, paths, batch_size, progress)
    row = {p: i for i, p in enumerate(paths)}

    def part(name: str) -> tuple[np.ndarray, list[str]]:
        recs: list[ImageRecord] = sets[name]
        return feats[[row[r.path] for r in recs]], [r.location for r in recs]

    result = {}
    for key, q, g in (("drone_to_satellite", "query_drone", "gallery_satellite"),
                      ("satellite_to_drone", "query_satellite", "gallery_drone")):
        (qf, qi), (gf, gi) = part(q), part(g)
        result[key] = {k: round(v, 4) for k, v in evaluate_embeddings(qf, qi, gf, gi).items()}
    return result


def sues200_sample_retrieval(embedder, distractors: Sequence[np.ndarray], photos_dir: str | Path | None = None,
                             batch_size: int = 16) -> dict:
    """Where the real SUES-200 drone photos rank their satellite tile among distractor tiles.

    Gallery = s0.png plus `distractors` (uint8 RGB tiles, e.g. `datasets.random_crops` of real
    rasters). Returns, per height and over all 12 photos, the photos' ranks of s0 (1 = best),
    their mean, and R@1 / R@5 in percent. One building only: a smoke test of cross-view
    retrieval on real photos, not a benchmark figure.
    """
    folder = Path(photos_dir) if photos_dir else SUES_PHOTOS
    sat = folder / "s0.png"
    photos = sorted(folder.glob("*-*.jpg"))
    if not sat.is_file() or not photos:
        raise InputError(f"SUES-200 sample photos not found in {folder} (need s0.png and <height>-<n>.jpg).")
    if not distractors:
        raise InputError("Give at least one distractor tile.")
    gallery = embed_images(embedder, [str(sat), *distractors], batch_size)
    queries = embed_images(embedder, [str(p) for p in photos], batch_size)
    sims = queries @ gallery.T
    ranks = 1 + (sims[:, 1:] > sims[:, :1]).sum(axis=1)

    def summary(r: np.ndarray) -> dict:
        return {"mean_rank": round(float(r.mean()), 2), "R@1": round(float(np.mean(r <= 1) * 100), 2),
                "R@5": round(float(np.mean(r <= 5) * 100), 2), "ranks": [int(x) for x in r]}

    heights = [p.name.split("-")[0] for p in photos]
    per = {h: summary(ranks[[i for i, x in enumerate(heights) if x == h]]) for h in sorted(set(heights), key=int)}
    return {"gallery_size": len(gallery), "photos": len(photos), "per_height": per, "all": summary(ranks)}

"""Retrieval metrics computed exactly as the University-1652 / SUES-200 evaluation code does.

For each query the gallery is ranked by similarity (dot product of L2-normalised embeddings);
the query's true matches are all gallery items of its location. Per query (the benchmark's
`compute_mAP`):
- CMC: 1 from the rank of the first true match on, so R@K is the share of queries with a true
  match in the top K (R@K for K beyond the gallery equals R@len(gallery));
- AP over all ngood true matches, in the trapezoid form of that code: for the i-th true match
  (0-based) at 0-based rank r, precision = (i + 1) / (r + 1), previous precision = i / r (1 when
  r = 0), and AP = sum over true matches of (previous + precision) / 2 / ngood.
Means are over all queries; a query with no true match in the gallery counts 0 in both, since
that code skips it in the sums but still divides by the number of queries. The benchmark's junk
rule (gallery label -1) never applies between drone and satellite views, so it is not modelled.
Ties in similarity are broken by gallery order (stable sort), which the benchmark leaves to
numpy's unstable argsort; with real embeddings exact ties do not occur.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_backend.core.errors import InputError

DEFAULT_KS = (1, 5, 10)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def per_query(sim: np.ndarray, q_ids: Sequence, g_ids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(first-hit rank, AP) per query from a (Q, G) similarity matrix; rank -1 when there is no true match."""
    sim = np.asarray(sim, dtype=np.float64)
    q, g = np.asarray(q_ids), np.asarray(g_ids)
    if sim.shape != (len(q), len(g)):
        raise InputError(f"Similarity matrix {sim.shape} does not fit {len(q)} queries x {len(g)} gallery items.")
    order = np.argsort(-sim, axis=1, kind="stable")
    good = g[order] == q[:, None]                      # (Q, G): true match at each rank
    ngood = good.sum(axis=1)
    hits = np.cumsum(good, axis=1)                     # i + 1 at the i-th true match
    r = np.arange(good.shape[1], dtype=np.float64)     # 0-based rank
    precision = hits / (r + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        previous = np.where(r == 0, 1.0, (hits - 1.0) / r)
    ap = np.where(good, (previous + precision) / 2.0, 0.0).sum(axis=1) / np.maximum(ngood, 1)
    first = np.where(ngood > 0, good.argmax(axis=1), -1)
    return first, np.where(ngood > 0, ap, 0.0)


def metrics_from_similarity(sim: np.ndarray, q_ids: Sequence, g_ids: Sequence,
                            ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"R@1", "R@5", "R@10", "AP"} in percent from a (Q, G) similarity matrix."""
    if len(q_ids) == 0 or len(g_ids) == 0:
        raise InputError("Retrieval needs at least one query and one gallery item.")
    first, ap = per_query(sim, q_ids, g_ids)
    out = {f"R@{k}": float(np.mean((first >= 0) & (first < k)) * 100.0) for k in ks}
    out["AP"] = float(np.mean(ap) * 100.0)
    return out


def evaluate_embeddings(q_feats: np.ndarray, q_ids: Sequence, g_feats: np.ndarray, g_ids: Sequence,
                        ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[str, float]:
    """Benchmark metrics (percent) of queries against a gallery; features are L2-normalised first.

    Queries are scored in chunks of at most `chunk` rows and about 4 million (query, gallery)
    entries, so memory stays bounded: University-1652 has 37 855 drone queries, and 701 satellite
    queries against 51 355 drone images.
    """
    qf, gf = _normalise(q_feats), _normalise(g_feats)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise InputError(f"Query features {qf.shape} and gallery features {gf.shape} do not have the same dimension.")
    if len(qf) != len(q_ids) or len(gf) != len(g_ids):
        raise InputError("Each query and gallery feature needs exactly one location id.")
    if len(qf) == 0 or len(gf) == 0:
        raise InputError("Retrieval needs at least one query and one gallery item.")
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    firsts, aps = [], []
    rows = max(1, min(chunk, 4_000_000 // len(gf)))
    for s in range(0, len(qf), rows):
        f, a = per_query(qf[s:s + rows] @ gf.T, q_ids[s:s + rows], g_ids)
        firsts.append(f)
        aps.append(a)
    first, ap = np.concatenate(firsts), np.concatenate(aps)
    out = {f"R@{k}": float(np.mean((first >= 0) & (first < k)) * 100.0) for k in ks}
    out["AP"] = float(np.mean(ap) * 100.0)
    return out


def both_directions(drone_q: tuple[np.ndarray, Sequence], sat_g: tuple[np.ndarray, Sequence],
                    sat_q: tuple[np.ndarray, Sequence], drone_g: tuple[np.ndarray, Sequence]) -> dict[str, dict]:
    """The benchmark report: drone queries against satellite gallery, and satellite against drone."""
    return {"drone_to_satellite": evaluate_embeddings(drone_q[0], drone_q[1], sat_g[0], sat_g[1]),
            "satellite_to_drone": evaluate_embeddings(sat_q[0], sat_q[1], drone_g[0], drone_g[1])}

"""Pseudo labels for unpaired images: k-reciprocal Jaccard distance, DBSCAN, cross-view voting.

CDTS learns from images nobody paired. It groups each view's features into pseudo locations
(clusters) and trains towards them; how good those groups are bounds what it can learn. Plain
cosine distance is fooled by hubs (one generic rooftop near everything), so, as the re-ID and
DMNIL line of work does, the distance between two images is the Jaccard distance between their
k-reciprocal neighbourhoods (Zhong et al., CVPR 2017): two images are close when they are each
other's neighbours and share neighbours. DBSCAN then finds dense groups without knowing how many
locations there are, and leaves the ambiguous images out (label -1).

Everything is sparse: only pairs whose neighbourhoods overlap are ever stored (any other pair is
at distance 1, farther than any DBSCAN eps), so tens of thousands of images fit in memory.
Nearest neighbours are computed with torch on the features' own device (GPU when training there);
the rest is plain numpy (no scipy/scikit-learn: QGIS's Python does not guarantee them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Features = np.ndarray | torch.Tensor


def _unit(features: Features) -> torch.Tensor:
    t = torch.as_tensor(features)
    return F.normalize(t.detach().float(), dim=1)


def knn(query: Features, base: Features, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k nearest neighbours of each query row among `base` rows: (similarities, indices), best first."""
    q, b = _unit(query), _unit(base)
    b = b.to(q.device)
    k = min(k, b.shape[0])
    sims, idx = [], []
    for s in range(0, q.shape[0], block):
        top = torch.topk(q[s:s + block] @ b.t(), k, dim=1)
        sims.append(top.values.cpu())
        idx.append(top.indices.cpu())
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy().astype(np.int64)


def _self_first(rank: np.ndarray) -> np.ndarray:
    """Put each row's own index first: exact duplicates (e.g. University-1652's repeated satellite
    images) tie at similarity 1 and could otherwise push an image out of its own list."""
    n = rank.shape[0]
    rows = np.arange(n)[:, None]
    missing = ~(rank == rows).any(axis=1)
    rank = rank.copy()
    rank[missing, -1] = np.arange(n)[missing]
    order = np.argsort(rank != rows, axis=1, kind="stable")
    return np.take_along_axis(rank, order, axis=1)


def _reciprocal(ranks: np.ndarray) -> np.ndarray:
    """mask[i, a]: is i also among the first m neighbours of ranks[i, a] (m = ranks.shape[1])?"""
    n, m = ranks.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), m)
    cols = ranks.ravel()
    return np.isin(cols * n + rows, rows * n + cols).reshape(n, m)


@dataclass
class SparseSimilarity:
    """Sparse symmetric (n, n) similarity as coordinate lists sorted by (row, col); absent = 0."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n, self.n), np.float32)
        out[self.rows, self.cols] = self.values
        return out


def _accumulate(n_rows: int, n: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum values sharing (row, col) over a block of `n_rows` rows: a dense bincount, then its non-zeros.

    Faster than sorting keys; callers keep n_rows · n small (see `_row_blocks`).
    """
    acc = np.bincount(rows * n + cols, weights=values, minlength=n_rows * n)
    nz = np.flatnonzero(acc)
    return nz // n, nz % n, acc[nz]


def _expand(ptr: np.ndarray, owners: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (owner, slot) pair, every position of segment `slot` of a ptr-indexed array:
    returns (owner per position, position)."""
    lens = ptr[slots + 1] - ptr[slots]
    total = int(lens.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(owners, lens), np.repeat(ptr[slots], lens) + offsets


def _row_blocks(cost: np.ndarray, budget: int = 1 << 22, dense: int = 1 << 23) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed cost stays near `budget` and whose dense accumulator
    (rows x n) stays under `dense` cells; at least one row each."""
    n = len(cost)
    cuts = np.searchsorted(np.cumsum(cost), np.arange(budget, cost.sum() + budget, budget), side="right")
    step = max(1, dense // max(n, 1))
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, n), np.arange(0, n, step), [n]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def jaccard_similarity(features: Features, k1: int = 30, k2: int = 6, max_distance: float | None = None,
                       chunk: int = 4096) -> SparseSimilarity:
    """k-reciprocal Jaccard similarity (1 − distance), sparse; absent pairs are at distance 1.

    The standard re-ranking computation: R(i, k1) = k1-reciprocal neighbours of i, expanded by
    each member's R(·, k1/2) when that overlaps R(i, k1) by more than 2/3; weights exp(−‖xi − xj‖²)
    normalised per row; local query expansion over the k2 nearest rows; then
    J(i, j) = Σ min / Σ max of the two weight rows. Small N (< k1) is handled by shrinking k1/k2.
    `max_distance` drops pairs farther than that (lossless for DBSCAN with eps ≤ max_distance).
    """
    f = _unit(features)
    n = f.shape[0]
    if n <= 1:
        return SparseSimilarity(n, np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.float32))
    k1 = max(1, min(k1, n - 1))
    kh = max(1, int(np.around(k1 / 2)))
    k2 = max(1, min(k2, n))
    _, rank = knn(f, f, k1 + 1)
    rank = _self_first(rank)
    r1, rh = rank, rank[:, :kh + 1]
    m1, mh = _reciprocal(r1), _reciprocal(rh)

    keys_all = []
    for s in range(0, n, chunk):  # expansion, chunked to bound the (pairs x k1/2) temporaries
        bi, ba = np.nonzero(m1[s:s + chunk])
        bi = bi + s
        bc = r1[bi, ba]
        base_keys = np.sort(bi * n + bc)
        cand, cmask = rh[bc], mh[bc]
        inside = np.isin(bi[:, None] * n + cand, base_keys) & cmask
        accept = inside.sum(axis=1) > (2.0 / 3.0) * cmask.sum(axis=1)
        sub = cmask[accept]
        ei = np.concatenate([bi, np.repeat(bi[accept], sub.sum(axis=1))])
        ej = np.concatenate([bc, cand[accept][sub]])
        keys_all.append(np.unique(ei * n + ej))
    keys = np.concatenate(keys_all)
    i, j = keys // n, keys % n

    w = np.empty(len(i), np.float64)
    for s in range(0, len(i), 1 << 16):
        a = torch.from_numpy(i[s:s + (1 << 16)]).to(f.device)
        b = torch.from_numpy(j[s:s + (1 << 16)]).to(f.device)
        sim = (f[a] * f[b]).sum(dim=1).double().cpu().numpy()
        w[s:s + len(sim)] = np.exp(-(2.0 - 2.0 * sim))  # exp(-squared distance) of unit vectors
    w /= np.bincount(i, weights=w, minlength=n)[i]
    if k2 > 1:  # V'[i] = mean of V over i's k2 nearest rows (itself first)
        ptr = np.searchsorted(i, np.arange(n + 1))
        near = rank[:, :k2]
        cost = np.diff(ptr)[near].sum(axis=1)
        parts = []
        for r0, r1 in _row_blocks(cost):
            owner, pos = _expand(ptr, np.repeat(np.arange(r1 - r0), k2), near[r0:r1].ravel())
            a, b, v = _accumulate(r1 - r0, n, owner, j[pos], w[pos] / k2)
            parts.append((a + r0, b, v))
        i, j, w = (np.concatenate(x) for x in zip(*parts))
    return _min_overlap(n, i, j, w, max_distance)


def _min_overlap(n: int, i: np.ndarray, j: np.ndarray, w: np.ndarray, max_distance: float | None
                 ) -> SparseSimilarity:
    """t(a, b) = Σ_k min(v_ak, v_bk) over shared columns k, returned as t / (2 − t), row block by row block.

    Rows of v sum to 1, so Σ max = 2 − Σ min: this is the weighted Jaccard similarity.
    """
    by_col = np.lexsort((i, j))
    col_rows, col_vals = i[by_col], w[by_col]
    col_ptr = np.searchsorted(j[by_col], np.arange(n + 1))
    row_ptr = np.searchsorted(i, np.arange(n + 1))
    col_len = np.diff(col_ptr)
    # Work per row = how many (row, column, other row) triples it expands to; blocks stay under budget.
    cost = np.bincount(i, weights=col_len[j], minlength=n)
    rows_out, cols_out, vals_out = [], [], []
    for r0, r1 in _row_blocks(cost):
        e0, e1 = row_ptr[r0], row_ptr[r1]
        entry, pos = _expand(col_ptr, np.arange(e0, e1), j[e0:e1])
        a, b, t = _accumulate(r1 - r0, n, i[entry] - r0, col_rows[pos], np.minimum(w[entry], col_vals[pos]))
        sim = np.minimum(t / (2.0 - t), 1.0)
        keep = (1.0 - sim) <= max_distance if max_distance is not None else slice(None)
        rows_out.append(a[keep] + r0)
        cols_out.append(b[keep])
        vals_out.append(sim[keep].astype(np.float32))
    return SparseSimilarity(n, np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(vals_out))


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber non-negative labels 0..K-1 in order of first appearance; -1 stays -1."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape, -1, np.int64)
    valid = labels >= 0
    if valid.any():
        uniq, first = np.unique(labels[valid], return_index=True)
        order = np.argsort(first, kind="stable")
        new = np.empty(len(uniq), np.int64)
        new[order] = np.arange(len(uniq))
        out[valid] = new[np.searchsorted(uniq, labels[valid])]
    return out


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of an undirected edge list: each node's smallest connected node index.

    Min-label propagation with pointer jumping; converges in a few passes on cluster graphs.
    """
    lab = np.arange(n)
    while True:
        new = lab.copy()
        np.minimum.at(new, a, lab[b])
        np.minimum.at(new, b, lab[a])
        new = new[new]
        if np.array_equal(new, lab):
            return lab
        lab = new


def dbscan(similarity: SparseSimilarity, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN on a sparse similarity (distance = 1 − similarity; absent pairs at distance 1).

    As scikit-learn's DBSCAN(metric='precomputed'): a point is core when at least `min_samples`
    points (itself included) lie within `eps`; clusters are the connected groups of core points;
    a non-core point within eps of a core point joins a cluster — here its nearest core point's,
    so the result does not depend on visiting order; everything else is noise (-1).
    """
    n = similarity.n
    d = 1.0 - similarity.values.astype(np.float64)
    near = d <= eps
    rows = np.concatenate([similarity.rows[near], np.arange(n)])
    cols = np.concatenate([similarity.cols[near], np.arange(n)])
    dist = np.concatenate([d[near], np.zeros(n)])
    _, first = np.unique(rows.astype(np.int64) * n + cols, return_index=True)
    rows, cols, dist = rows[first], cols[first], dist[first]
    core = np.bincount(rows, minlength=n) >= min_samples
    labels = np.full(n, -1, np.int64)
    if not core.any():
        return labels
    cc = core[rows] & core[cols]
    comp = _components(n, rows[cc], cols[cc])
    labels[core] = comp[core]
    border = ~core[rows] & core[cols]
    if border.any():
        bi, bj, bd = rows[border], cols[border], dist[border]
        order = np.lexsort((bj, bd, bi))
        bi, bj = bi[order], bj[order]
        firsts = np.r_[True, bi[1:] != bi[:-1]]
        labels[bi[firsts]] = comp[bj[firsts]]
    return compact_labels(labels)


def cluster_view(features: Features, eps: float, k1: int = 30, k2: int = 6, min_samples: int = 4) -> np.ndarray:
    """Pseudo labels for one view: Jaccard distance, then DBSCAN. -1 marks images left out."""
    return dbscan(jaccard_similarity(features, k1, k2, max_distance=eps), eps, min_samples)


def _first_mode(votes: np.ndarray) -> np.ndarray:
    """Per row, the most frequent value; ties go to the value seen first (the nearest neighbour)."""
    if votes.shape[1] == 0:
        return np.full(votes.shape[0], -1, np.int64)
    counts = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)
    return votes[np.arange(votes.shape[0]), np.argmax(counts, axis=1)]


def vote_satellite_labels(sat_features: Features, drone_features: Features, drone_labels: np.ndarray,
                          k_drone: int = 10, k_smooth: int = 5) -> np.ndarray:
    """Give every satellite image a drone cluster label: the majority label of its `k_drone` nearest
    drone images, then the majority of those votes over its `k_smooth` nearest satellite images
    (itself included, so it wins ties).

    This is what puts both views into one label space (DMNIL's shared stage). A majority of
    outlier (-1) drone neighbours leaves the satellite image out too: better no label than a wrong one.
    """
    drone_labels = np.asarray(drone_labels, dtype=np.int64)
    n_sat = int(torch.as_tensor(sat_features).shape[0])
    if n_sat == 0 or len(drone_labels) == 0:
        return np.full(n_sat, -1, np.int64)
    _, nd = knn(sat_features, drone_features, k_drone)
    voted = _first_mode(drone_labels[nd])
    _, ns = knn(sat_features, sat_features, k_smooth)
    return _first_mode(voted[_self_first(ns)])


def apply_anchor_groups(labels: np.ndarray, locations: np.ndarray | None) -> np.ndarray:
    """Known locations override clustering: every image of one known location shares one label,
    and two known locations never share one.

    `locations[i]` is the known location id of image i, or -1. A group takes the most common
    label among its members that no earlier group took, or a fresh label; members clustered
    elsewhere move to it. Labels are renumbered 0..K-1 afterwards.
    """
    out = np.asarray(labels, dtype=np.int64).copy()
    if locations is None:
        return compact_labels(out)
    locations = np.asarray(locations, dtype=np.int64)
    fresh = int(out.max()) + 1 if out.size else 0
    taken: set[int] = set()
    order = np.argsort(locations, kind="stable")
    locs = locations[order]
    starts = np.flatnonzero(np.r_[True, locs[1:] != locs[:-1]]) if len(locs) else np.array([], int)
    for s, e in zip(starts, np.r_[starts[1:], len(locs)]):
        if locs[s] < 0:
            continue
        members = order[s:e]
        current = out[members]
        values, counts = np.unique(current[current >= 0], return_counts=True)
        choice = -1
        for idx in np.argsort(-counts, kind="stable"):
            if int(values[idx]) not in taken:
                choice = int(values[idx])
                break
        if choice < 0:
            choice, fresh = fresh, fresh + 1
        taken.add(choice)
        out[members] = choice
    return compact_labels(out)

"""CDTS on constructed cases: Jaccard distance, DBSCAN, pseudo labels, memories, voting, anchors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_backend.nn.cdiktnet import (
    CDTSConfig,
    CDTSMemory,
    ClusterMemory,
    apply_anchor_groups,
    cluster_view,
    dbscan,
    jaccard_similarity,
    make_pseudo_labels,
    vote_satellite_labels,
)
from model_backend.nn.cdiktnet.clustering import SparseSimilarity


def dense_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The re-ranking Jaccard distance written the slow, obvious way (loops, dense matrices)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    k1, k2 = min(k1, n - 1), min(k2, n)
    kh = int(np.around(k1 / 2))
    sim = x @ x.T
    rank = np.argsort(-sim, axis=1, kind="stable")
    rank = np.array([[i] + [c for c in row if c != i] for i, row in enumerate(rank)])

    def reciprocal(i: int, k: int) -> np.ndarray:
        return np.array([c for c in rank[i, :k + 1] if i in rank[c, :k + 1]])

    v = np.zeros((n, n))
    for i in range(n):
        base = reciprocal(i, k1)
        grown = list(base)
        for c in base:
            cand = reciprocal(c, kh)
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                grown.extend(cand)
        grown = np.unique(grown)
        w = np.exp(-(2 - 2 * sim[i, grown]))
        v[i, grown] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((n, n))
    for i in range(n):
        t = np.minimum(v[i][None, :], v).sum(axis=1)
        out[i] = 1 - t / (2 - t)
    return np.maximum(out, 0)


def clusters_with_outliers(seed: int = 0, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Three tight groups of six around orthogonal centres, plus three ambiguous images, each
    midway between two groups (the images DBSCAN must leave out rather than guess)."""
    rng = np.random.default_rng(seed)
    c = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]
    pts = [c[g] + 0.03 * rng.normal(size=(6, dim)) for g in range(3)]
    mids = np.stack([c[0] + c[1], c[1] + c[2], c[0] + c[2]]) / np.sqrt(2)
    pts.append(mids + 0.01 * rng.normal(size=(3, dim)))
    truth = np.r_[np.repeat([0, 1, 2], 6), [-1, -1, -1]]
    return np.concatenate(pts).astype(np.float32), truth


def same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    """Equal up to renaming: every true group has one label of its own, outliers are -1."""
    if not np.array_equal(labels < 0, truth < 0):
        return False
    groups = [set(labels[truth == g].tolist()) for g in np.unique(truth[truth >= 0])]
    return all(len(g) == 1 for g in groups) and len(set().union(*groups)) == len(groups)


@pytest.mark.parametrize(("n", "k1", "k2"), [(40, 10, 4), (50, 5, 1), (15, 30, 6), (2, 30, 6)])
def test_sparse_jaccard_equals_the_textbook_computation(n: int, k1: int, k2: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 16))
    x[: n // 2] += 3 * rng.normal(size=16)  # some structure, so neighbourhoods overlap unevenly
    got = 1 - jaccard_similarity(x.astype(np.float32), k1, k2).to_dense()
    assert np.abs(got - dense_jaccard(x, k1, k2)).max() < 1e-5
    assert np.allclose(np.diag(got), 0, atol=1e-6)
    assert np.allclose(got, got.T, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_labels_recover_separated_clusters_and_leave_outliers_out(seed: int) -> None:
    x, truth = clusters_with_outliers(seed)
    labels = cluster_view(x, eps=0.4, k1=5, k2=6, min_samples=4)
    assert same_partition(labels, truth), labels
    shuffled = np.random.default_rng(1).permutation(len(x))  # order does not matter
    assert same_partition(cluster_view(x[shuffled], eps=0.4, k1=5, k2=6, min_samples=4), truth[shuffled])


def test_pseudo_labels_with_fewer_images_than_k1() -> None:
    """N = 21 < k1 = 30: k1 shrinks to N - 1. Every image is then everyone's reciprocal neighbour,
    so the ambiguous ones may join a group as border points, but the groups stay apart."""
    x, truth = clusters_with_outliers()
    labels = cluster_view(x, eps=0.4, k1=30, k2=6, min_samples=4)
    inliers = truth >= 0
    assert same_partition(labels[inliers], truth[inliers]), labels
    assert set(labels[~inliers].tolist()) <= set(labels[inliers].tolist()) | {-1}
    assert cluster_view(x[:3], eps=0.4).tolist() == [-1, -1, -1]  # fewer images than min_samples
    assert cluster_view(x[:1], eps=0.4).tolist() == [-1]
    assert cluster_view(np.zeros((0, 32), np.float32), eps=0.4).tolist() == []


def naive_dbscan(dist: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Textbook DBSCAN (breadth-first over core points), borders joining their nearest core's cluster."""
    n = len(dist)
    nbrs = [np.flatnonzero(dist[i] <= eps) for i in range(n)]
    core = np.array([len(nb) >= min_samples for nb in nbrs])
    labels = np.full(n, -1)
    cur = 0
    for i in range(n):
        if not core[i] or labels[i] >= 0:
            continue
        queue, labels[i] = [i], cur
        while queue:
            p = queue.pop()
            for q in nbrs[p]:
                if core[q] and labels[q] < 0:
                    labels[q] = cur
                    queue.append(q)
        cur += 1
    for i in np.flatnonzero(~core):
        cores = [q for q in nbrs[i] if core[q]]
        if cores:
            labels[i] = labels[min(cores, key=lambda q: (dist[i, q], q))]
    return labels


def test_dbscan_matches_the_textbook_algorithm() -> None:
    rng = np.random.default_rng(0)
    for eps in (0.1, 0.12, 0.15):
        n = 60
        pos = rng.uniform(0, 1, size=(n, 2))
        dist = np.minimum(np.linalg.norm(pos[:, None] - pos[None], axis=2), 1.0).astype(np.float32)
        r, c = np.nonzero(dist < 1.0)
        sim = SparseSimilarity(n, r, c, 1 - dist[r, c])
        got = dbscan(sim, eps=eps, min_samples=4)
        want = naive_dbscan(1.0 - sim.to_dense().astype(np.float64), eps, 4)  # the same rounding
        assert (want >= 0).sum() > 10 and (want < 0).any(), eps  # a case with clusters and noise
        assert same_partition(got, want), eps


def test_dbscan_core_border_and_noise_on_a_chain() -> None:
    """0-1-2-3 are mutually close (cores); 4 touches only 3 (border); 5 is alone (noise)."""
    d = np.ones((6, 6))
    np.fill_diagonal(d, 0)
    for a in range(4):
        for b in range(4):
            d[a, b] = 0.0 if a == b else 0.2
    d[3, 4] = d[4, 3] = 0.3
    r, c = np.nonzero(d < 1)
    labels = dbscan(SparseSimilarity(6, r, c, (1 - d[r, c]).astype(np.float32)), eps=0.35, min_samples=4)
    assert labels.tolist() == [0, 0, 0, 0, 0, -1]


def test_cluster_memory_moves_the_hit_centroid_by_the_momentum_rule() -> None:
    g = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    mem = ClusterMemory(centroids, temperature=0.05, momentum=0.2)
    feats = torch.randn(4, 8, generator=g) * 3  # unnormalised on purpose
    labels = torch.tensor([2, -1, 2, 0])
    x = F.normalize(feats, dim=1)
    step1 = F.normalize(0.2 * centroids[2] + 0.8 * x[0], dim=0)
    want2 = F.normalize(0.2 * step1 + 0.8 * x[2], dim=0)  # second hit applied after the first
    want0 = F.normalize(0.2 * centroids[0] + 0.8 * x[3], dim=0)
    mem.update(feats, labels)
    assert torch.allclose(mem.features[2], want2, atol=1e-6)
    assert torch.allclose(mem.features[0], want0, atol=1e-6)
    assert torch.equal(mem.features[1], centroids[1]) and torch.equal(mem.features[3], centroids[3])
    assert torch.allclose(mem.features.norm(dim=1), torch.ones(4), atol=1e-6)
    mem.update(feats[:1], labels[:1], momentum=0.1)  # later epochs: 0.1
    assert torch.allclose(mem.features[2], F.normalize(0.1 * want2 + 0.9 * x[0], dim=0), atol=1e-6)


def test_cluster_memory_loss_is_ce_over_centroids_ignoring_outliers() -> None:
    g = torch.Generator().manual_seed(1)
    centroids = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    mem = ClusterMemory(centroids, temperature=0.05, momentum=0.2)
    feats = torch.randn(5, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 2, -1, 1, -1])
    loss = mem(feats, labels)
    valid = labels >= 0
    manual = F.cross_entropy(F.normalize(feats[valid], dim=1) @ centroids.t() / 0.05, labels[valid])
    assert torch.allclose(loss, manual)
    loss.backward()
    assert feats.grad is not None and torch.all(feats.grad[~valid] == 0) and torch.any(feats.grad[valid] != 0)
    assert not torch.equal(mem.features, centroids)  # training mode: forward also updated the memory
    none = mem(torch.randn(2, 8, requires_grad=True), torch.tensor([-1, -1]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_satellite_label_is_the_drone_neighbours_majority() -> None:
    rng = np.random.default_rng(0)
    axes = np.eye(8, dtype=np.float32)
    # Drone images near axis 0: ten of them, seven labelled 5 and three labelled 2 (the three nearest).
    drone = axes[0] + 0.05 * rng.normal(size=(10, 8)).astype(np.float32)
    drone[:3] = axes[0] + 0.01 * rng.normal(size=(3, 8))
    drone_labels = np.array([2, 2, 2, 5, 5, 5, 5, 5, 5, 5])
    # A second place (axis 1) whose drone images are outliers.
    drone = np.concatenate([drone, axes[1] + 0.05 * rng.normal(size=(10, 8))]).astype(np.float32)
    drone_labels = np.r_[drone_labels, np.full(10, -1)]
    sat = np.stack([axes[0], axes[1]]).astype(np.float32)
    got = vote_satellite_labels(sat, drone, drone_labels, k_drone=10, k_smooth=1)
    assert got.tolist() == [5, -1]  # majority wins over proximity; an outlier majority stays out

    # Smoothing over the 5 nearest satellite images: a lone dissenter joins its neighbours' label.
    sats = np.concatenate([axes[0] + 0.02 * rng.normal(size=(5, 8)), axes[1][None]]).astype(np.float32)
    dr = np.concatenate([axes[0] + 0.02 * rng.normal(size=(12, 8)), axes[1] + 0.02 * rng.normal(size=(12, 8))])
    labels = np.r_[np.full(12, 4), np.full(12, 7)].astype(np.int64)
    sats[0] = 0.45 * axes[0] + 0.55 * axes[1]  # in between: its drone vote says 7
    assert vote_satellite_labels(sats, dr.astype(np.float32), labels, 10, 1)[0] == 7
    smoothed = vote_satellite_labels(sats, dr.astype(np.float32), labels, 10, 5)
    assert smoothed[1:5].tolist() == [4, 4, 4, 4] and smoothed[0] == 4


def test_known_locations_are_fixed_positives() -> None:
    labels = np.array([0, 0, 0, 1, 1, -1, -1, 2, 2])
    locs = np.array([7, 7, -1, 7, -1, 9, 9, 3, -1])
    out = apply_anchor_groups(labels, locs)
    assert len(set(out[locs == 7])) == 1 and out[0] == out[2]  # majority cluster 0 absorbs image 3
    assert out[3] != out[4]  # image 3 left its old cluster
    assert out[5] == out[6] >= 0 and out[5] not in out[[0, 3, 7, 8]]  # outliers of one location: a new cluster
    # Two known locations never share a cluster, even if clustering merged them.
    merged = apply_anchor_groups(np.array([0, 0, 0, 0]), np.array([1, 1, 2, 2]))
    assert merged[0] == merged[1] != merged[2] == merged[3]


def _two_view_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Drone and satellite views of three places (six images each), views offset from each other."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(32, 32)))[0][:3]
    view_shift = 0.3 * np.linalg.qr(rng.normal(size=(32, 32)))[0][3]
    drone = np.concatenate([c + 0.06 * rng.normal(size=(6, 32)) for c in centres])
    sat = np.concatenate([c + view_shift + 0.04 * rng.normal(size=(6, 32)) for c in centres])
    return drone.astype(np.float32), sat.astype(np.float32)


def test_dual_path_and_shared_labels_with_anchors() -> None:
    drone, sat = _two_view_clusters()
    cfg = CDTSConfig()
    d_loc = np.full(18, -1)
    s_loc = np.full(18, -1)
    d_loc[[0, 1]] = 100  # two drone photos of place 0 are paired with satellite image 0
    s_loc[0] = 100
    dual = make_pseudo_labels(drone, sat, cfg, shared=False, drone_locations=d_loc, sat_locations=s_loc)
    assert not dual.shared and dual.n_drone_clusters == 3 and dual.n_satellite_clusters == 3
    assert dual.summary()["drone_outliers"] == 0
    place0_d, place0_s = dual.drone[0], dual.satellite[0]
    assert (dual.drone_cross[:6] == place0_s).all() and (dual.drone_cross[6:] == -1).all()
    assert (dual.satellite_cross[:6] == place0_d).all() and (dual.satellite_cross[6:] == -1).all()

    shared = make_pseudo_labels(drone, sat, cfg, shared=True, drone_locations=d_loc, sat_locations=s_loc)
    assert shared.shared
    for place in range(3):  # every satellite image joins its own place's drone cluster
        d = set(shared.drone[place * 6:(place + 1) * 6])
        s = set(shared.satellite[place * 6:(place + 1) * 6])
        assert len(d) == 1 and d == s
    assert shared.satellite[0] == shared.drone[0]


def test_cdts_memories_train_and_update_per_stage() -> None:
    drone, sat = _two_view_clusters(1)
    cfg = CDTSConfig()
    d_loc, s_loc = np.full(18, -1), np.full(18, -1)
    d_loc[0], s_loc[0] = 5, 5
    for shared in (False, True):
        labels = make_pseudo_labels(drone, sat, cfg, shared=shared, drone_locations=d_loc, sat_locations=s_loc)
        mem = CDTSMemory.build(drone, sat, labels, cfg, epoch=0)
        assert mem.shared == shared and mem.drone.momentum == 0.2
        assert CDTSMemory.build(drone, sat, labels, cfg, epoch=3).drone.momentum == 0.1
        idx = torch.tensor([0, 1, 6, 7, 12, 13])
        fd = torch.tensor(drone)[idx].requires_grad_(True)
        fs = torch.tensor(sat)[idx].requires_grad_(True)
        sat_before = None if mem.satellite is None else mem.satellite.features.clone()
        out = mem(fd, torch.as_tensor(labels.drone[idx]), fs, torch.as_tensor(labels.satellite[idx]),
                  torch.as_tensor(labels.drone_cross[idx]), torch.as_tensor(labels.satellite_cross[idx]))
        assert torch.isfinite(out.total)
        out.total.backward()
        assert fd.grad is not None and fs.grad is not None
        if shared:
            assert float(out.cross) == 0.0
        else:
            assert float(out.cross.detach()) > 0.0  # the anchored place links the two memories
            # The satellite memory moved only by satellite features (drone cross terms never update it).
            expect = ClusterMemory(sat_before.clone(), cfg.temperature, 0.2)
            expect.update(fs.detach(), torch.as_tensor(labels.satellite[idx]))
            assert torch.allclose(mem.satellite.features, expect.features)

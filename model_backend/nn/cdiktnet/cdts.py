"""CDTS, the cross-domain transfer sub-network: learning from images nobody paired.

Each epoch the training loop embeds every unpaired image (`embed_with_flip`), turns the
embeddings into pseudo labels (`make_pseudo_labels`) and builds cluster memories from them
(`CDTSMemory.build`); each step then pulls a batch's features towards their cluster centroid and
away from all others (`CDTSMemory.forward`), and moves the hit centroids towards the batch.

Two stages, as in DMNIL (the first author's unsupervised method, "based on CDIKTNet"):
- dual path: each view is clustered on its own (drone and satellite images of one place look too
  different to share clusters at first); a memory per view; where known pairs (CDIS's anchors)
  link a drone cluster to a satellite cluster, each view is also pulled to the other's centroid;
- shared space: satellite images take the drone cluster label their drone neighbours vote for,
  and one memory over both views keeps them in one embedding space.
Known pairs stay fixed positives throughout: images of one known location always share a label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model_backend.nn.cdiktnet.clustering import (
    Features,
    apply_anchor_groups,
    cluster_view,
    compact_labels,
    vote_satellite_labels,
)


@dataclass(frozen=True)
class CDTSConfig:
    """CDTS settings; defaults are DMNIL's (METHOD.md)."""

    k1: int = 30
    """k-reciprocal neighbourhood size of the Jaccard distance."""
    k2: int = 6
    """Local query expansion size of the Jaccard distance."""
    eps_drone: float = 0.40
    eps_satellite: float = 0.30
    """DBSCAN radius per view; satellite tiles of one place are near-identical, hence tighter."""
    min_samples: int = 4
    temperature: float = 0.05
    momentum_first_epoch: float = 0.2
    momentum: float = 0.1
    """Share of the OLD centroid kept at each update (new = m·old + (1−m)·feature): small = fast-moving."""
    cross_view_weight: float = 1.0
    """Weight of the dual path's cross-view terms (each view against the other's memory)."""
    vote_k_drone: int = 10
    vote_k_satellite: int = 5
    shared_from_epoch: int = 20
    """First epoch of the shared space. DMNIL (no pairs, random start) waits 20 of 40; a CDIS-trained
    start aligns the views already, so an earlier switch is plausible — set it per run."""

    def momentum_for_epoch(self, epoch: int) -> float:
        return self.momentum_first_epoch if epoch == 0 else self.momentum

    def is_shared(self, epoch: int) -> bool:
        return epoch >= self.shared_from_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def embed_with_flip(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Clustering features: the embedding averaged with that of the mirrored image, renormalised.

    Averaging removes the left/right bias of a single view, so clusters follow places, not poses.
    Call with the model in eval mode (BatchNorm running statistics, no dropout), under autocast on
    GPU if wanted; pass the result to `make_pseudo_labels` on the same device to run kNN there.
    """
    a = model(images)
    b = model(torch.flip(images, dims=[3]))
    return F.normalize(a.float() + b.float(), dim=1)


@dataclass
class PseudoLabels:
    """One epoch's labels; -1 = left out. In the shared space both views use one label range."""

    drone: np.ndarray
    satellite: np.ndarray
    drone_cross: np.ndarray
    """Per drone image, the satellite-memory label it is pulled to (dual path), or -1."""
    satellite_cross: np.ndarray
    shared: bool

    @property
    def n_drone_clusters(self) -> int:
        return int(self.drone.max()) + 1 if self.drone.size and self.drone.max() >= 0 else 0

    @property
    def n_satellite_clusters(self) -> int:
        return int(self.satellite.max()) + 1 if self.satellite.size and self.satellite.max() >= 0 else 0

    def summary(self) -> dict[str, Any]:
        return {"shared": self.shared, "drone_clusters": self.n_drone_clusters,
                "satellite_clusters": self.n_satellite_clusters,
                "drone_outliers": int((self.drone < 0).sum()), "satellite_outliers": int((self.satellite < 0).sum())}


def cross_view_labels(drone: np.ndarray, satellite: np.ndarray, drone_locations: np.ndarray | None,
                      sat_locations: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Link drone and satellite clusters through known locations present in both views.

    Returns, per image, the other view's cluster label it is linked to, or -1. A cluster linked
    to several (only possible when locations were merged by clustering) keeps its first link.
    """
    d_cross = np.full(len(drone), -1, np.int64)
    s_cross = np.full(len(satellite), -1, np.int64)
    if drone_locations is None or sat_locations is None:
        return d_cross, s_cross
    d2s: dict[int, int] = {}
    s2d: dict[int, int] = {}
    for loc in np.intersect1d(drone_locations[drone_locations >= 0], sat_locations[sat_locations >= 0]):
        ld = drone[drone_locations == loc]
        ls = satellite[sat_locations == loc]
        if ld.size and ls.size and ld[0] >= 0 and ls[0] >= 0:
            d2s.setdefault(int(ld[0]), int(ls[0]))
            s2d.setdefault(int(ls[0]), int(ld[0]))
    for lab, other in d2s.items():
        d_cross[drone == lab] = other
    for lab, other in s2d.items():
        s_cross[satellite == lab] = other
    return d_cross, s_cross


def make_pseudo_labels(drone_features: Features, sat_features: Features, config: CDTSConfig, *, shared: bool,
                       drone_locations: np.ndarray | None = None,
                       sat_locations: np.ndarray | None = None) -> PseudoLabels:
    """Cluster both views (dual path) or cluster drones and vote satellite labels (shared space).

    `drone_locations` / `sat_locations`: known location id per image (-1 = unpaired): CDIS's
    anchors, kept as fixed positives whatever the clustering says.
    """
    dl = None if drone_locations is None else np.asarray(drone_locations, np.int64)
    sl = None if sat_locations is None else np.asarray(sat_locations, np.int64)
    drone = cluster_view(drone_features, config.eps_drone, config.k1, config.k2, config.min_samples)
    drone = apply_anchor_groups(drone, dl)
    if not shared:
        sat = cluster_view(sat_features, config.eps_satellite, config.k1, config.k2, config.min_samples)
        sat = apply_anchor_groups(sat, sl)
        d_cross, s_cross = cross_view_labels(drone, sat, dl, sl)
        return PseudoLabels(drone, sat, d_cross, s_cross, shared=False)
    sat = vote_satellite_labels(sat_features, drone_features, drone, config.vote_k_drone, config.vote_k_satellite)
    if sl is not None:
        fresh = int(max(drone.max(initial=-1), sat.max(initial=-1))) + 1
        for loc in np.unique(sl[sl >= 0]):
            members = sl == loc
            known = drone[dl == loc] if dl is not None else np.zeros(0, np.int64)
            known = known[known >= 0]
            if known.size:
                sat[members] = known[0]  # anchors: a known pair's satellite joins its drones' cluster
            else:
                sat[members], fresh = fresh, fresh + 1
    both = compact_labels(np.concatenate([drone, sat]))
    drone, sat = both[:len(drone)], both[len(drone):]
    return PseudoLabels(drone, sat, drone.copy(), sat.copy(), shared=True)


def cluster_centroids(features: Features, labels: np.ndarray, n_clusters: int | None = None) -> torch.Tensor:
    """L2-normalised mean of each cluster's (normalised) features; rows ordered by label."""
    f = F.normalize(torch.as_tensor(features).detach().float(), dim=1)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=f.device)
    if n_clusters is None:
        n_clusters = int(lab.max().item()) + 1 if lab.numel() else 0
    k = max(int(n_clusters), 0)
    sums = torch.zeros(k, f.shape[1], device=f.device)
    keep = lab >= 0
    sums.index_add_(0, lab[keep], f[keep])
    return F.normalize(sums, dim=1)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows under DDP (every rank must pass the same batch size: use drop_last)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ClusterMemory(nn.Module):
    """Cluster centroids as a non-learned memory; loss = CE(feature · centroidsᵀ / τ, pseudo label).

    The centroids are not parameters: they follow the features by a momentum rule, applied per
    sample in batch order (new = normalise(m · old + (1 − m) · feature)), as DMNIL does. Outliers
    (label -1) contribute neither loss nor update.
    """

    features: torch.Tensor

    def __init__(self, centroids: torch.Tensor, temperature: float = 0.05, momentum: float = 0.2) -> None:
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        self.register_buffer("features", F.normalize(centroids.detach().float(), dim=1).clone())

    @classmethod
    def from_labels(cls, features: Features, labels: np.ndarray, n_clusters: int | None = None,
                    temperature: float = 0.05, momentum: float = 0.2) -> ClusterMemory:
        return cls(cluster_centroids(features, labels, n_clusters), temperature, momentum)

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the centroids, outliers ignored; no update."""
        with torch.autocast(device_type=feats.device.type, enabled=False):  # logits / 0.05 want fp32
            x = F.normalize(feats.float(), dim=1)
            logits = x @ self.features.t() / self.temperature
            valid = labels >= 0
            if not bool(valid.any()):
                return logits.sum() * 0.0  # keeps the graph (and DDP) whole
            return F.cross_entropy(logits[valid], labels[valid])

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor, momentum: float | None = None) -> None:
        """Move each hit centroid towards its batch features, one sample at a time, in batch order.

        Vectorised by rounds: round r applies every label's r-th sample at once, which equals the
        sequential rule because samples of different labels touch different rows.
        """
        m = self.momentum if momentum is None else momentum
        x = _gather(F.normalize(feats.detach().float(), dim=1))
        y = _gather(labels.detach().to(x.device, torch.long))
        keep = y >= 0
        x, y = x[keep], y[keep]
        if y.numel() == 0:
            return
        sorted_y, perm = torch.sort(y, stable=True)
        _, counts = torch.unique_consecutive(sorted_y, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        occurrence = torch.empty_like(y)
        occurrence[perm] = torch.arange(len(y), device=y.device) - starts
        mem = self.features.clone()
        for r in range(int(occurrence.max().item()) + 1):
            sel = occurrence == r
            rows = y[sel]
            mem[rows] = F.normalize(m * mem[rows] + (1 - m) * x[sel], dim=1)
        self.features = mem  # a new tensor: logits already computed keep the old one for backward

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, update: bool = True) -> torch.Tensor:
        out = self.loss(feats, labels)
        if update and self.training:
            self.update(feats, labels)
        return out


@dataclass
class CDTSLossResult:
    total: torch.Tensor
    drone: torch.Tensor
    satellite: torch.Tensor
    cross: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "drone": float(self.drone.detach()),
                "satellite": float(self.satellite.detach()), "cross": float(self.cross.detach())}


class CDTSMemory(nn.Module):
    """The epoch's memories: dual path (one per view) or shared (one for both views)."""

    def __init__(self, drone: ClusterMemory, satellite: ClusterMemory | None, cross_view_weight: float = 1.0) -> None:
        super().__init__()
        self.drone = drone
        self.satellite = satellite  # None in the shared space: `drone` then holds both views
        self.cross_view_weight = cross_view_weight

    @property
    def shared(self) -> bool:
        return self.satellite is None

    @classmethod
    def build(cls, drone_features: Features, sat_features: Features, labels: PseudoLabels, config: CDTSConfig,
              epoch: int, device: torch.device | str | None = None) -> CDTSMemory:
        """Centroids from this epoch's features and labels, momentum for this epoch, on `device`
        (default: the features' device)."""
        m, t = config.momentum_for_epoch(epoch), config.temperature
        fd = torch.as_tensor(drone_features).float()
        fs = torch.as_tensor(sat_features).float().to(fd.device)
        if labels.shared:
            both = np.concatenate([labels.drone, labels.satellite])
            mem = cls(ClusterMemory.from_labels(torch.cat([fd, fs]), both, temperature=t, momentum=m), None,
                      config.cross_view_weight)
        else:
            mem = cls(ClusterMemory.from_labels(fd, labels.drone, labels.n_drone_clusters, t, m),
                      ClusterMemory.from_labels(fs, labels.satellite, labels.n_satellite_clusters, t, m),
                      config.cross_view_weight)
        return mem.to(device) if device is not None else mem

    def forward(self, drone_feats: torch.Tensor, drone_labels: torch.Tensor, sat_feats: torch.Tensor,
                sat_labels: torch.Tensor, drone_cross: torch.Tensor | None = None,
                sat_cross: torch.Tensor | None = None) -> CDTSLossResult:
        """Loss for one batch of each view (labels index this epoch's `PseudoLabels`), then the updates.

        Cross-view terms (dual path only) pull drone features to the satellite centroid their
        cluster is linked to and vice versa; they never update the other view's memory.
        """
        if self.satellite is None:
            ld = self.drone.loss(drone_feats, drone_labels)
            ls = self.drone.loss(sat_feats, sat_labels)
            cross = ld.new_zeros(())
            if self.training:
                self.drone.update(torch.cat([drone_feats, sat_feats]), torch.cat([drone_labels, sat_labels]))
        else:
            ld = self.drone.loss(drone_feats, drone_labels)
            ls = self.satellite.loss(sat_feats, sat_labels)
            cross = ld.new_zeros(())
            if drone_cross is not None:
                cross = cross + self.satellite.loss(drone_feats, drone_cross)
            if sat_cross is not None:
                cross = cross + self.drone.loss(sat_feats, sat_cross)
            if self.training:
                self.drone.update(drone_feats, drone_labels)
                self.satellite.update(sat_feats, sat_labels)
        total = ld + ls + self.cross_view_weight * cross
        return CDTSLossResult(total=total, drone=ld, satellite=ls, cross=cross)

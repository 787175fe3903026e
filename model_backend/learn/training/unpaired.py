"""CDTS helpers: embed every image, turn embeddings into pseudo labels, and plan P x K batches.

Under torchrun each rank embeds its share of the images, the features are gathered, rank 0
clusters and broadcasts the labels: DBSCAN run separately on every rank could disagree by a
floating-point hair, and ranks whose memories disagree would train different models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model_backend.core.dist import broadcast, is_distributed
from model_backend.learn.datasets import PairTransform
from model_backend.learn.training.data import Images, Item
from model_backend.learn.training.engine import Runtime
from model_backend.nn.cdiktnet import CDTSConfig, PseudoLabels, embed_with_flip, make_pseudo_labels


@torch.no_grad()
def embed_all(net: torch.nn.Module, items: Sequence[Item], transform: PairTransform, rt: Runtime,
              batch_size: int = 64) -> torch.Tensor:
    """(N, C) flip-averaged unit embeddings of `items` (evaluation preprocessing), on the device."""
    ds = Images(items, [False] * len(items), transform, 0, train=False)
    mine = list(range(rt.rank, len(items), rt.world))
    loader = DataLoader(torch.utils.data.Subset(ds, mine), batch_size=batch_size, num_workers=rt.workers,
                        generator=torch.Generator())
    parts = []
    for x, _ in loader:
        with rt.autocast():
            parts.append(embed_with_flip(net, rt.to_device(x)).float())
    local = torch.cat(parts) if parts else torch.zeros(0, 1, device=rt.device)
    if rt.world == 1 or not is_distributed():
        return local
    # ranks hold rows r, r + world, ...; pad to equal length, gather, interleave back into item order
    size = (len(items) + rt.world - 1) // rt.world
    padded = torch.zeros(size, local.shape[1], device=local.device, dtype=local.dtype)
    padded[:len(local)] = local
    chunks = [torch.empty_like(padded) for _ in range(rt.world)]
    dist.all_gather(chunks, padded)
    out = torch.empty(len(items), local.shape[1], device=local.device, dtype=local.dtype)
    for r, chunk in enumerate(chunks):
        n = len(range(r, len(items), rt.world))
        out[r::rt.world] = chunk[:n]
    return out


def pseudo_labels(fd: torch.Tensor, fs: torch.Tensor, cfg: CDTSConfig, epoch: int, drone_known: np.ndarray,
                  sat_known: np.ndarray, rt: Runtime) -> PseudoLabels:
    """This epoch's labels (dual path before `cfg.shared_from_epoch`, shared after), same on every rank.

    k1 is capped at a third of the smaller view so that on small sets a neighbourhood stays a
    neighbourhood (k1 = 30 among 40 images would make every image everyone's neighbour).
    """
    labels = None
    if rt.is_main:
        k1 = max(4, min(cfg.k1, min(len(fd), len(fs)) // 3))
        kcfg = CDTSConfig(**{**cfg.to_dict(), "k1": k1, "k2": min(cfg.k2, k1)})
        labels = make_pseudo_labels(fd, fs, kcfg, shared=cfg.is_shared(epoch),
                                    drone_locations=_or_none(drone_known), sat_locations=_or_none(sat_known))
    out = broadcast(labels)
    if not isinstance(out, PseudoLabels):
        raise RuntimeError("rank 0 sent no pseudo labels")
    return out


def _or_none(known: np.ndarray) -> np.ndarray | None:
    return known if (known >= 0).any() else None


def cluster_batches(labels: np.ndarray, n_ids: int, k: int, n_batches: int, seed: list[int]) -> list[list[int]]:
    """`n_batches` batches of `n_ids` pseudo identities x `k` images each (drawn with replacement
    when a cluster is smaller), seeded; outliers (-1) never appear. [] when there is no cluster."""
    members: dict[int, np.ndarray] = {}
    for lab in np.unique(labels[labels >= 0]):
        members[int(lab)] = np.flatnonzero(labels == lab)
    if not members:
        return []
    ids = np.array(sorted(members))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        chosen = rng.choice(ids, size=min(n_ids, len(ids)), replace=False)
        batch: list[int] = []
        for lab in chosen:
            m = members[int(lab)]
            batch.extend(int(i) for i in rng.choice(m, size=k, replace=len(m) < k))
        out.append(batch)
    return out

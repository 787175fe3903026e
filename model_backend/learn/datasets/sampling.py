"""Datasets over image records, and the sampler that keeps one pair per location in a batch.

The contrastive loss treats every other pair in a batch as a negative; two pairs of the same
location in one batch would be pushed apart although they match. So batches are built from
distinct locations (as Sample4Geo's and MEAN's custom shuffles do), and an epoch still visits
every pair once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from model_backend.core.errors import InputError
from model_backend.learn.datasets.common import ImageRecord, check_paired, label_map
from model_backend.learn.datasets.transforms import PairTransform, load_rgb, to_model_input


class PairedDataset(Dataset):
    """Every drone image with a satellite image of its location: item = (drone, satellite, label).

    Locations with several satellite images (DMNIL duplicates them) cycle through them, so the
    pairing is deterministic. Without a transform, items are uint8 arrays at their file size.
    """

    def __init__(self, pairs_or_drone: Sequence[tuple[ImageRecord, ImageRecord]] | Sequence[ImageRecord],
                 satellite: Sequence[ImageRecord] | None = None, transform: PairTransform | None = None,
                 labels: dict[str, int] | None = None) -> None:
        if satellite is not None:
            drone = list(pairs_or_drone)
            check_paired(drone, satellite, "the training set")  # type: ignore[arg-type]
            sats: dict[str, list[ImageRecord]] = defaultdict(list)
            for s in satellite:
                sats[s.location].append(s)
            self.pairs = [(d, sats[d.location][i % len(sats[d.location])]) for i, d in enumerate(drone)]
        else:
            self.pairs = list(pairs_or_drone)  # type: ignore[arg-type]
        if not self.pairs:
            raise InputError("No drone-satellite pairs to train on; check the training folders.")
        self.label_of = labels or label_map(d for d, _ in self.pairs)
        self.labels = [self.label_of[d.location] for d, _ in self.pairs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        d, s = self.pairs[i]
        dimg, simg = load_rgb(d.path), load_rgb(s.path)
        if self.transform is None:
            return np.asarray(dimg), np.asarray(simg), self.labels[i]
        dt, st = self.transform(dimg, simg)
        return dt, st, self.labels[i]


class ImageDataset(Dataset):
    """Single images (unpaired views, or evaluation): item = (image, index).

    The index, not the location, is returned on purpose: unpaired training must not see labels,
    and evaluation looks ids up in `records` itself.
    """

    def __init__(self, records: Sequence[ImageRecord], size: int | None = None,
                 transform: Callable[[object], torch.Tensor] | None = None) -> None:
        self.records = list(records)
        self.size, self.transform = size, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        img = load_rgb(self.records[i].path)
        if self.transform is not None:
            return self.transform(img), i
        return (to_model_input(img, self.size) if self.size else np.asarray(img)), i


class LocationBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose labels are all different; every index once per epoch.

    Each batch takes one remaining item from each of `batch_size` locations drawn at random among
    those with items left; when fewer locations than a batch remain, the last batches are smaller
    (or dropped with `drop_last`). Seeded by (seed, epoch): call `set_epoch` each epoch. Under DDP
    each of `num_replicas` ranks takes every num_replicas-th batch, cut to the same count on all.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise InputError(f"Batch size must be at least 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise InputError(f"Rank {rank} is outside 0..{num_replicas - 1}.")
        self.labels = list(labels)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: dict[int, list[int]] = defaultdict(list)
        for i, lab in enumerate(self.labels):
            groups[lab].append(i)
        pools = {lab: [idx[j] for j in rng.permutation(len(idx))] for lab, idx in sorted(groups.items())}
        batches: list[list[int]] = []
        while pools:
            live = sorted(pools)
            picked = [live[j] for j in rng.permutation(len(live))[:self.batch_size]]
            batch = []
            for lab in picked:
                batch.append(pools[lab].pop())
                if not pools[lab]:
                    del pools[lab]
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        if self.num_replicas > 1:
            per_rank = len(batches) // self.num_replicas
            batches = batches[self.rank::self.num_replicas][:per_rank]
        self._plan = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

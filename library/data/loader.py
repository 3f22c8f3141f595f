"""DataLoaders for the training loop, with worker processes that can outlive an epoch.

`--persistent_data_loader_workers` keeps the workers (and their copy of the dataset) alive between
epochs, so an epoch starts without forking and pickling again. A DataLoader with persistent
workers must be created once, so its dataset cannot be one epoch's batches: `RunDataset` serves a
batch of any epoch, addressed by (epoch, position), and `EpochSampler`, which runs in the main
process, is pointed at the next epoch and its resume position before each pass. Batches are the
same as `group.epoch_dataset(epoch, seed, start)` gives, because they are built by it.

    feeder = BatchFeeder(group, seed, num_workers=4, persistent=True)
    for epoch in ...:
        for index, batch in enumerate(feeder.epoch(epoch, start=k), start=k): ...

Several processes (accelerate launch / torchrun): the group's batches are made global first
(`use_global_batches`: batch size x processes), and each process takes a contiguous share of every
batch (`shard_bounds`): process r of N trains on items [offset, offset + count) of batch i, for
every i, so all processes get the same number of batches, every image of an epoch is trained on
exactly once across them, and a step sees what one process with the multiplied batch size would.
A batch smaller than N (the last one of a bucket) gives the processes without an item of their
own a copy of its last item with weight 0 (`Shard.padded`). A batch then carries `"shard"`, which
the training loop uses to weight the loss and to draw this share of the global batch's noise.

`--overfit_batches N` (`OverfitGroup`): every epoch is the first N batches of epoch 0.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch


class Shard(NamedTuple):
    """One process's share of a global batch: items [offset, offset + count) of `total`."""

    offset: int
    count: int
    total: int
    padded: bool = False   # no item of its own: it trains on a copy of one with weight 0

    def loss_scale(self, processes: int) -> float:
        """Factor for this process's mean loss: averaging the scaled losses (or their gradients)
        over the processes gives the mean over the whole global batch, also for unequal shares."""
        return 0.0 if self.padded else processes * self.count / self.total


def shard_bounds(total: int, rank: int, world: int) -> Shard:
    """Contiguous, near-equal shares (sizes differ by at most one) in rank order."""
    if world <= 1:
        return Shard(0, total, total)
    base, extra = divmod(total, world)
    if base == 0 and rank >= extra:
        return Shard(total - 1, 1, total, padded=True)
    return Shard(rank * base + min(rank, extra), base + (1 if rank < extra else 0), total)


def batch_length(batch: dict) -> int:
    """Items in a batch: the length of its first list or the first dimension of its first tensor."""
    for value in batch.values():
        if isinstance(value, (list, tuple)):
            return len(value)
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    raise ValueError("cannot tell the number of items of a batch without lists or tensors")


def slice_batch(batch: dict, rank: int, world: int) -> dict:
    """This process's share of a whole batch: every value whose first dimension is the batch."""
    total = batch_length(batch)
    shard = shard_bounds(total, rank, world)
    part = slice(shard.offset, shard.offset + shard.count)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == total:
            value = value[part]
        elif isinstance(value, (list, tuple)) and len(value) == total:
            value = value[part]
        out[key] = value
    out["shard"] = shard
    return out


def take_shard(dataset, index: int, rank: int, world: int) -> dict:
    """Item `index` of an epoch dataset, or this process's share of it with several processes.
    A dataset with `shard_item(index, rank, world)` builds only the share; others build the whole
    batch and slice it."""
    if world <= 1:
        return dataset[index]
    build = getattr(dataset, "shard_item", None)
    return build(index, rank, world) if build is not None else slice_batch(dataset[index], rank, world)


def use_global_batches(group, processes: int):
    """Make the group's batches global (batch size x processes) for `processes` > 1; returns it."""
    if processes > 1:
        setter = getattr(group, "set_batch_scale", None)
        if setter is None:
            raise TypeError(f"{type(group).__name__} cannot make global batches (no set_batch_scale)")
        setter(processes)
    return group


def shares_batches(group, processes: int) -> bool:
    """True when the group's batches are global for this many processes (use_global_batches)."""
    return processes <= 1 or getattr(group, "batch_scale", 1) == processes


class OverfitGroup:
    """Lightning's overfit_batches: every epoch is the first `n` batches of epoch 0 (same images,
    same augmentations); everything else is the wrapped group's."""

    def __init__(self, group, n: int):
        self.group = group
        self.n = max(1, min(int(n), group.num_batches_per_epoch))

    def __getattr__(self, name):
        if name == "group":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.group, name)

    @property
    def num_batches_per_epoch(self) -> int:
        return self.n

    def epoch_dataset(self, epoch: int, seed: int | None = None, start: int = 0):
        return FirstBatches(self.group.epoch_dataset(0, seed), self.n, start)


class FirstBatches(torch.utils.data.Dataset):
    """Items start .. n-1 of an epoch dataset."""

    def __init__(self, inner, n: int, start: int = 0):
        if not 0 <= start <= n:
            raise ValueError(f"start {start} is outside the epoch's {n} batches")
        self.inner, self.n, self.start = inner, n, start
        self.needs_workers = getattr(inner, "needs_workers", True)

    def __len__(self) -> int:
        return self.n - self.start

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.inner[self.start + i]

    def shard_item(self, i: int, rank: int, world: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return take_shard(self.inner, self.start + i, rank, world)


class RunDataset(torch.utils.data.Dataset):
    """Item (epoch, position) is batch `position` of `epoch` (this process's share of it with
    several processes); picklable for workers."""

    def __init__(self, group, seed: int, rank: int = 0, world: int = 1):
        self.group, self.seed, self.rank, self.world = group, seed, rank, world
        self._epoch, self._batches = None, None  # one epoch's batch list, built once per process

    def batches(self, epoch: int):
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, self.group.epoch_dataset(epoch, self.seed)
        return self._batches

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch

    def __getitem__(self, key) -> dict:
        epoch, position = key
        return take_shard(self.batches(epoch), position, self.rank, self.world)

    def __getstate__(self):
        return {"group": self.group, "seed": self.seed, "rank": self.rank, "world": self.world,
                "_epoch": None, "_batches": None}


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, position) for position = start .. end of the epoch set by `set_epoch`."""

    def __init__(self, dataset: RunDataset):
        self.dataset, self.epoch, self.start = dataset, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        total = len(self.dataset.batches(epoch))
        if not 0 <= start <= total:
            raise ValueError(f"start {start} is outside the epoch's {total} batches")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.dataset.batches(self.epoch)) - self.start

    def __iter__(self):
        return iter([(self.epoch, p) for p in range(self.start, self.start + len(self))])


class BatchFeeder:
    """One DataLoader for the run (persistent workers) or a fresh one per epoch (the default).
    With `world` > 1 it yields process `rank`'s share of every batch (see the module text)."""

    def __init__(self, group, seed: int, num_workers: int = 0, persistent: bool = False,
                 pin_memory: bool = False, rank: int = 0, world: int = 1):
        self.group, self.seed = group, int(seed)
        self.rank, self.world = int(rank), int(world)
        # more workers than CPUs only compete (and torch warns about it in every run)
        self.num_workers = max(0, min(int(num_workers), os.cpu_count() or 1))
        # A dataset kind may say it gains nothing from workers (everything already in memory).
        if not getattr(group.epoch_dataset(0, self.seed), "needs_workers", True):
            self.num_workers = 0
        # torch refuses persistent workers without workers; with none there is nothing to keep.
        self.persistent = bool(persistent) and self.num_workers > 0
        self.pin_memory = pin_memory
        self._loader = None
        self._sampler = None

    def _make(self, epoch: int):
        dataset = RunDataset(self.group, self.seed, self.rank, self.world)
        sampler = EpochSampler(dataset)
        # A private generator: making a loader must not draw from the global RNG (resume stays
        # exact); it only seeds the workers, and no batch depends on that seed.
        generator = torch.Generator().manual_seed(self.seed + (0 if self.persistent else epoch))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler,
                                             num_workers=self.num_workers,
                                             persistent_workers=self.persistent,
                                             pin_memory=self.pin_memory, generator=generator)
        return loader, sampler

    def epoch(self, epoch: int, start: int = 0):
        """An iterable of the epoch's batches from position `start` (the resume position)."""
        if self._loader is None or not self.persistent:
            self._loader, self._sampler = self._make(epoch)
        self._sampler.set_epoch(epoch, start)
        return self._loader

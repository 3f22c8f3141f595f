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
"""
from __future__ import annotations

import torch


class RunDataset(torch.utils.data.Dataset):
    """Item (epoch, position) is batch `position` of `epoch`; picklable for workers."""

    def __init__(self, group, seed: int):
        self.group, self.seed = group, seed
        self._epoch, self._batches = None, None  # one epoch's batch list, built once per process

    def batches(self, epoch: int):
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, self.group.epoch_dataset(epoch, self.seed)
        return self._batches

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch

    def __getitem__(self, key) -> dict:
        epoch, position = key
        return self.batches(epoch)[position]

    def __getstate__(self):
        return {"group": self.group, "seed": self.seed, "_epoch": None, "_batches": None}


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
    """One DataLoader for the run (persistent workers) or a fresh one per epoch (the default)."""

    def __init__(self, group, seed: int, num_workers: int = 0, persistent: bool = False,
                 pin_memory: bool = False):
        self.group, self.seed = group, int(seed)
        self.num_workers = max(0, int(num_workers))
        # A dataset kind may say it gains nothing from workers (everything already in memory).
        if not getattr(group.epoch_dataset(0, self.seed), "needs_workers", True):
            self.num_workers = 0
        # torch refuses persistent workers without workers; with none there is nothing to keep.
        self.persistent = bool(persistent) and self.num_workers > 0
        self.pin_memory = pin_memory
        self._loader = None
        self._sampler = None

    def _make(self, epoch: int):
        dataset = RunDataset(self.group, self.seed)
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

"""Validation loss as kohya has it: a held-out share of the images, scored with fixed noise.

The split is seeded (`--validation_seed`, else `--seed`), so the same folders give the same
held-out images on every run. Each validation batch draws its noise and timesteps from a generator
seeded by (validation seed, batch index), so the same weights always give the same number and the
curves of different runs can be compared.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


def split_validation(group, fraction: float, seed: int):
    """(training group, validation group or None): per dataset, `fraction` of its training images
    (not regularization images) are held out, each seen once per validation pass."""
    from library.data.group import DatasetGroup

    if not fraction:
        return group, None
    rng = np.random.default_rng([int(seed) % (1 << 64), 0x5A11])
    val_ids: set[int] = set()
    for d in range(len(group.datasets)):
        candidates = [i for i, rec in enumerate(group.images) if rec.dataset == d and not rec.is_reg]
        count = min(len(candidates) - 1, max(1, math.floor(fraction * len(candidates))))
        if count > 0:
            val_ids.update(candidates[j] for j in rng.permutation(len(candidates))[:count])
    if not val_ids:
        return group, None
    train = [rec for i, rec in enumerate(group.images) if i not in val_ids]
    held_out = [dataclasses.replace(rec, repeats=1) for i, rec in enumerate(group.images) if i in val_ids]
    return DatasetGroup(group.datasets, train, group.seed), DatasetGroup(group.datasets, held_out, group.seed)


@torch.no_grad()
def validation_loss(val_group, seed: int, compute_loss, device, max_batches: int | None = None) -> float:
    """Mean loss over the validation batches; `compute_loss(batch, generator)` draws all its noise
    and timesteps from `generator`."""
    refs = val_group.batches_for_epoch(0, seed)[:max_batches]
    dataset = val_group.epoch_dataset(0, seed)
    total, count = torch.zeros((), device=device), 0
    for i in range(len(refs)):
        generator = torch.Generator(device=device).manual_seed(int(seed) * 100_003 + i)
        total += compute_loss(dataset[i], generator).detach().float()
        count += 1
    return float(total / max(count, 1))

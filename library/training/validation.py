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
def validation_loss(val_group, seed: int, compute_loss, device, max_batches: int | None = None,
                    accelerator=None) -> float:
    """Mean loss over the validation batches; `compute_loss(batch, generator)` draws all its noise
    and timesteps from `generator`.

    With several processes (`accelerator`) each batch is shared as in training when the group's
    batches are global (library.training.loop.prepare_group), else whole batches go round-robin.
    Every process gets the same number; with shared batches it is the number one process computes
    with the multiplied batch size.
    """
    from library.data.loader import shares_batches, take_shard
    from library.training.accel import reduce_sum
    from library.training.noise import drawing_for

    dataset = val_group.epoch_dataset(0, seed)
    count = len(dataset) if max_batches is None else min(max_batches, len(dataset))
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    shared = world > 1 and shares_batches(val_group, world)
    total = torch.zeros((), device=device)
    for i in range(count):
        if world > 1 and not shared and i % world != rank:
            continue
        batch = take_shard(dataset, i, rank, world) if shared else dataset[i]
        shard = batch.get("shard") if shared else None
        generator = torch.Generator(device=device).manual_seed(int(seed) * 100_003 + i)
        with drawing_for(shard):
            loss = compute_loss(batch, generator).detach().float()
        # this process's part of the batch mean (the parts of all processes add up to it)
        total += loss * (shard.loss_scale(world) / world if shard is not None else 1.0)
    if accelerator is not None:
        total = reduce_sum(accelerator, total)
    return float(total / max(count, 1))

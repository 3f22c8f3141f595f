"""The dataset group the trainers use: images placed in buckets, and deterministic batches.

An epoch's batches depend only on (seed, epoch): images are shuffled inside each bucket and the
batch order is shuffled with a generator seeded from those two numbers, and each image's
augmentations use a generator seeded from (seed, epoch, batch position, place in the batch). So a
resumed run that skips the first k batches of an epoch sees exactly what an uninterrupted run would
have, and a process that builds only its share of a batch (several processes, see
library.data.loader) gives each image what a single process would.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from library.data.buckets import Placement
from library.data.config import DatasetConfig
from library.data.transforms import load_sample, process_caption, to_tensor

_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1  # separate random streams for order and augmentation


@dataclass
class ImageRecord:
    path: str
    caption: str
    size: tuple[int, int]      # (w, h), upright
    placement: Placement
    dataset: int               # index into group.datasets
    subset: int                # index into group.datasets[dataset].subsets
    is_reg: bool
    repeats: int               # times per epoch; for reg images after balancing (0 = unused)
    caption_source: str = ""   # caption file extension used, or "class token" / "none" / "metadata"
    tags: str | None = None    # fine-tuning metadata's "tags" (kohya's tag frequency counts these)
    conditioning: str | None = None  # its mask image (conditioning_data_dir), see library.data.masks


@dataclass(frozen=True)
class BatchRef:
    """One batch of an epoch: image indices (into group.images) from one dataset and bucket."""

    dataset: int
    bucket: tuple[int, int]
    items: tuple[int, ...]


def _rng(*keys) -> np.random.Generator:
    # SeedSequence needs non-negative ints; any Python int seed maps to one deterministically.
    return np.random.default_rng([int(k) % (1 << 64) for k in keys])


class DatasetGroup:
    """All datasets of a run. Build with `build_dataset_group`; see that module for checks."""

    def __init__(self, datasets: list[DatasetConfig], images: list[ImageRecord], seed: int | None = None):
        self.datasets = datasets
        self.images = images
        self.seed = 0 if seed is None else int(seed)
        self.latents: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # With cached latents: image index -> {batch key: (mask, flipped mask or None)}, uint8.
        self.masks: dict[int, dict[str, tuple]] = {}
        self.latents_cached = False
        # Processes that share each batch (set_batch_scale): batches hold batch_size x this many images.
        self.batch_scale = 1
        # dataset -> {bucket: [image index repeated `repeats` times]}, buckets in sorted order.
        self.buckets: list[dict[tuple[int, int], list[int]]] = []
        for d in range(len(datasets)):
            buckets: dict[tuple[int, int], list[int]] = {}
            for i, rec in enumerate(images):
                if rec.dataset == d and rec.repeats > 0:
                    buckets.setdefault(rec.placement.bucket, []).extend([i] * rec.repeats)
            self.buckets.append(dict(sorted(buckets.items())))

    # --- counts -------------------------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """Training images times their repeats (kohya's num_train_images)."""
        return sum(r.repeats for r in self.images if not r.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularization images times their folder's repeats, before balancing (kohya's count)."""
        return sum(self.subset_of(r).num_repeats for r in self.images if r.is_reg)

    def batch_size(self, dataset: int) -> int:
        """Images per batch of one dataset: its batch size (per process) x the processes sharing it."""
        return self.datasets[dataset].batch_size * self.batch_scale

    def set_batch_scale(self, processes: int) -> None:
        """Make every batch global: `processes` x the per-process batch size, so that the processes,
        each taking its share (library.data.loader.shard_bounds), train on what one process with the
        multiplied batch size would."""
        self.batch_scale = max(1, int(processes))

    def num_batches(self, dataset: int) -> int:
        bs = self.batch_size(dataset)
        return sum(-(-len(items) // bs) for items in self.buckets[dataset].values())

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(self.num_batches(d) for d in range(len(self.datasets)))

    def subset_of(self, rec: ImageRecord):
        return self.datasets[rec.dataset].subsets[rec.subset]

    # --- batches ------------------------------------------------------------------------------
    def batches_for_epoch(self, epoch: int, seed: int | None = None) -> list[BatchRef]:
        """Every image x repeats exactly once, in batches of one dataset and bucket; the last
        batch of a bucket may be smaller. Same (seed, epoch) -> same list."""
        seed = self.seed if seed is None else seed
        rng = _rng(seed, epoch, _SHUFFLE_STREAM)
        refs = []
        for d, buckets in enumerate(self.buckets):
            bs = self.batch_size(d)
            for bucket, items in buckets.items():
                order = rng.permutation(len(items))
                shuffled = [items[i] for i in order]
                refs += [BatchRef(d, bucket, tuple(shuffled[k:k + bs])) for k in range(0, len(shuffled), bs)]
        return [refs[i] for i in rng.permutation(len(refs))]

    def epoch_dataset(self, epoch: int, seed: int | None = None, start: int = 0) -> "EpochDataset":
        """A torch Dataset whose item i is batch (start + i) of the epoch; use batch_size=None."""
        seed = self.seed if seed is None else seed
        return EpochDataset(self, self.batches_for_epoch(epoch, seed), epoch, seed, start)

    def make_batch(self, ref: BatchRef, epoch: int, position: int, seed: int | None = None,
                   first: int = 0, count: int | None = None) -> dict:
        """Load (or take cached latents for) one batch. `position` is its index in the epoch;
        `first`/`count` build only those items of it (a process's share), with the same
        augmentations the whole batch would give them."""
        from library.data import masks

        seed = self.seed if seed is None else seed
        want_alpha, want_cond = masks.dataset_mask_kinds(self.datasets[ref.dataset])
        latents, images, captions, weights, paths, alphas, conds = [], [], [], [], [], [], []
        stop = len(ref.items) if count is None else first + count
        for slot in range(first, stop):
            idx = ref.items[slot]
            rec = self.images[idx]
            sub = self.subset_of(rec)
            # Each item has its own generator, drawn in a fixed order (flip, crop, colour, caption),
            # so an item's augmentations do not depend on which other items are built with it.
            rng = _rng(seed, epoch, _AUGMENT_STREAM, position, slot)
            flip = bool(sub.flip_aug and rng.random() < 0.5)
            alpha = cond = None
            if self.latents_cached:
                plain, flipped = self.latents[idx]
                use_flip = flip and flipped is not None
                latents.append(flipped if use_flip else plain)
                cached = self.masks.get(idx, {})
                alpha = cached.get(masks.ALPHA_KEY, (None, None))[1 if use_flip else 0]
                cond = cached.get(masks.CONDITIONING_KEY, (None, None))[1 if use_flip else 0]
            else:
                arr, alpha, cond = load_sample(rec.path, rec.placement, rng, random_crop=sub.random_crop, flip=flip,
                                               color_aug=sub.color_aug, alpha=sub.alpha_mask,
                                               conditioning=rec.conditioning if sub.conditioning_data_dir else None,
                                               interpolation=sub.resize_interpolation)
                images.append(to_tensor(arr))
            if want_alpha:
                alphas.append(masks.alpha_tensor(alpha, rec.placement.bucket))
            if want_cond:
                conds.append(masks.conditioning_tensor(cond, rec.placement.bucket))
            captions.append(process_caption(rec.caption, sub, rng, epoch))
            weights.append(self.datasets[rec.dataset].prior_loss_weight if rec.is_reg else 1.0)
            paths.append(rec.path)
        return {
            "latents": torch.stack(latents) if latents else None,
            "images": torch.stack(images) if images else None,
            "captions": captions,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "image_paths": paths,
            # None when the dataset has no masks, so the loss is unmasked (see library.data.masks)
            masks.ALPHA_KEY: torch.stack(alphas) if alphas else None,
            masks.CONDITIONING_KEY: torch.stack(conds) if conds else None,
        }

    # --- caching, reports ---------------------------------------------------------------------
    def check_text_encoder_caching_allowed(self) -> None:
        from library.data.text_cache import check_text_encoder_caching_allowed

        check_text_encoder_caching_allowed(self)

    def possible_captions(self) -> list[str]:
        """Every caption a batch can carry when no caption op is random except whole-caption
        dropout (see library.data.text_cache); sorted, so caching order is stable."""
        from library.data.text_cache import possible_captions

        return possible_captions(self)

    def check_caching_allowed(self) -> None:
        from library.data.latents import check_caching_allowed

        check_caching_allowed(self)

    def cache_latents(self, vae, to_disk: bool = False, vae_batch_size: int = 1, device=None, dtype=None,
                      progress: bool = True) -> None:
        """Encode every used image once with `vae` (see library.data.latents)."""
        from library.data.latents import cache_latents

        cache_latents(self, vae, to_disk=to_disk, vae_batch_size=vae_batch_size, device=device,
                      dtype=dtype, progress=progress)

    def summary(self) -> str:
        from library.data.report import summary

        return summary(self)

    def metadata(self) -> dict[str, str]:
        from library.data.report import metadata

        return metadata(self)


class EpochDataset(torch.utils.data.Dataset):
    """Batches of one epoch from a start position; picklable for DataLoader workers."""

    def __init__(self, group: DatasetGroup, refs: list[BatchRef], epoch: int, seed: int, start: int = 0):
        if not 0 <= start <= len(refs):
            raise ValueError(f"start {start} is outside the epoch's {len(refs)} batches")
        self.group, self.refs, self.epoch, self.seed, self.start = group, refs, epoch, seed, start

    def __len__(self) -> int:
        return len(self.refs) - self.start

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        pos = self.start + i
        return self.group.make_batch(self.refs[pos], self.epoch, pos, self.seed)

    def shard_item(self, i: int, rank: int, world: int) -> dict:
        """This process's share of item i (see library.data.loader.shard_bounds), built alone."""
        from library.data.loader import shard_bounds

        if not 0 <= i < len(self):
            raise IndexError(i)
        pos = self.start + i
        shard = shard_bounds(len(self.refs[pos].items), rank, world)
        batch = self.group.make_batch(self.refs[pos], self.epoch, pos, self.seed, shard.offset, shard.count)
        batch["shard"] = shard
        return batch

"""The dataset library shared by the trainers (kohya-compatible flags, folders and TOML).

    configs = dataset_configs_from_args(args)
    group = build_dataset_group(configs, seed=args.seed, skip_bad_images=args.skip_bad_images)
    print(group.summary())
    group.cache_latents(vae, to_disk=..., vae_batch_size=..., device=..., dtype=...)  # optional
    for batch in DataLoader(group.epoch_dataset(epoch, seed, start=k), batch_size=None): ...

Modules: config (settings, flags), toml_config (--dataset_config), scan (folders, captions),
probe (image checks), buckets, transforms (pixels, captions), build (checks + group), group
(batches), latents (VAE caching), report (summary, ss_* metadata).
"""
from library.data.build import build_dataset_group
from library.data.config import DatasetConfig, SubsetConfig, dataset_configs_from_args
from library.data.group import BatchRef, DatasetGroup, EpochDataset, ImageRecord
from library.data.latents import encode_latents
from library.data.toml_config import load_dataset_config

__all__ = [
    "BatchRef", "DatasetConfig", "DatasetGroup", "EpochDataset", "ImageRecord", "SubsetConfig",
    "build_dataset_group", "dataset_configs_from_args", "encode_latents", "load_dataset_config",
]

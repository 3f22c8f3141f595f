"""The dataset library shared by the trainers (kohya-compatible flags, folders and TOML).

    configs = dataset_configs_from_args(args)
    group = build_dataset_group(configs, seed=args.seed, skip_bad_images=args.skip_bad_images)
    print(group.summary())
    group.cache_latents(vae, to_disk=..., vae_batch_size=..., device=..., dtype=...)  # optional
    feeder = BatchFeeder(group, seed, num_workers=..., persistent=...)
    for batch in feeder.epoch(epoch, start=k): ...   # == group.epoch_dataset(epoch, seed, start=k)

Modules: config (settings, flags), toml_config (--dataset_config), scan (folders, captions),
finetune (--in_json metadata), probe (image checks), buckets, transforms (pixels, captions),
masks (--alpha_mask / conditioning_data_dir loss masks),
build (checks + group), group (batches), loader (DataLoaders, persistent workers), latents (VAE
caching), text_cache (--cache_text_encoder_outputs), report (summary, ss_* metadata).
"""
from library.data.build import build_dataset_group
from library.data.config import DatasetConfig, SubsetConfig, dataset_configs_from_args
from library.data.group import BatchRef, DatasetGroup, EpochDataset, ImageRecord
from library.data.latents import encode_latents
from library.data.loader import BatchFeeder
from library.data.toml_config import load_dataset_config

__all__ = [
    "BatchFeeder", "BatchRef", "DatasetConfig", "DatasetGroup", "EpochDataset", "ImageRecord", "SubsetConfig",
    "build_dataset_group", "dataset_configs_from_args", "encode_latents", "load_dataset_config",
]

"""Small image/caption generators for the dataset tests."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path, size=(32, 32), seed=0, fmt=None) -> Path:
    """A random-noise RGB image of `size` (w, h); format from the extension unless given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_folder(root, name, n=2, size=(32, 32), ext=".png", caption_ext=None, captions=None, seed=0):
    """A folder `root/name` with n images (img0..), optionally a caption file per image."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(folder / f"img{i}{ext}", size=size, seed=seed + i)
        if caption_ext:
            text = captions[i] if captions else f"caption {i}, tag{i}"
            (folder / f"img{i}{caption_ext}").write_text(text, encoding="utf-8")
    return folder


def make_args(**kw) -> argparse.Namespace:
    """An argparse Namespace with kohya's dataset flags at their defaults, overridden by kw."""
    base = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, resolution="32",
                train_batch_size=1, enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024,
                bucket_reso_steps=64, bucket_no_upscale=False, caption_extension=".caption",
                shuffle_caption=False, keep_tokens=0, flip_aug=False, color_aug=False, random_crop=False,
                prior_loss_weight=1.0, caption_prefix=None, caption_suffix=None, seed=0,
                caption_separator=",", keep_tokens_separator="", secondary_separator=None,
                caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0,
                in_json=None, dataset_repeats=1)
    base.update(kw)
    return argparse.Namespace(**base)


def tiny_vae(seed=0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                         norm_num_groups=32).eval()

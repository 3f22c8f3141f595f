"""Turning a file into a training tensor, and a caption into the text the model sees.

All randomness comes from the numpy Generator passed in, which the group seeds per batch, so a
batch is the same whether it is built in the main process, a worker, or after a resume.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from library.data.buckets import Placement
from library.data.probe import load_rgb

CAPTION_SEPARATOR = ","
HUE_SHIFT_MAX = 8          # in OpenCV hue units (0..180), i.e. +-16 degrees
BRIGHTNESS_JITTER = 0.05   # +-5% gain


def resize_and_crop(arr: np.ndarray, placement: Placement, rng: np.random.Generator | None = None,
                    random_crop: bool = False) -> np.ndarray:
    """Resize an HxWx3 uint8 image to cover the bucket, then crop to it (centered unless random)."""
    h, w = arr.shape[:2]
    rw, rh = placement.resized
    if (rw, rh) != (w, h):
        # INTER_AREA averages source pixels when shrinking (no aliasing); Lanczos is sharpest up.
        interp = cv2.INTER_AREA if rw * rh < w * h else cv2.INTER_LANCZOS4
        arr = cv2.resize(arr, (rw, rh), interpolation=interp)
    bw, bh = placement.bucket
    extra_x, extra_y = rw - bw, rh - bh
    if random_crop and rng is not None:
        left = int(rng.integers(0, extra_x + 1))
        top = int(rng.integers(0, extra_y + 1))
    else:
        left, top = extra_x // 2, extra_y // 2
    return arr[top:top + bh, left:left + bw]


def color_jitter(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small hue shift and brightness change: colours vary without changing what is shown."""
    hsv = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2HSV)
    shift = int(round(rng.uniform(-HUE_SHIFT_MAX, HUE_SHIFT_MAX)))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    arr = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gain = 1.0 + rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER)
    return np.clip(arr.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1], the range the VAE expects."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # arrays viewing a PIL image are read-only; torch wants its own
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def load_image(path: str, placement: Placement, rng: np.random.Generator | None = None, *,
               random_crop=False, flip=False, color_aug=False) -> np.ndarray:
    """Read, resize, crop and augment one image; returns HxWx3 uint8 at the bucket size."""
    arr = np.asarray(load_rgb(path))
    arr = resize_and_crop(arr, placement, rng, random_crop)
    if flip:
        arr = arr[:, ::-1]
    if color_aug and rng is not None:
        arr = color_jitter(arr, rng)
    return arr


def process_caption(caption: str, subset, rng: np.random.Generator | None) -> str:
    """Apply shuffle_caption (keeping the first keep_tokens tags in place), then prefix/suffix.

    The prefix and suffix are added after shuffling, as current kohya does, so they stay put
    and do not count towards keep_tokens.
    """
    if subset.shuffle_caption and rng is not None and CAPTION_SEPARATOR in caption:
        tags = [t.strip() for t in caption.split(CAPTION_SEPARATOR) if t.strip()]
        keep = max(0, subset.keep_tokens)
        fixed, flex = tags[:keep], tags[keep:]
        order = rng.permutation(len(flex))
        caption = ", ".join(fixed + [flex[i] for i in order])
    parts = (subset.caption_prefix, caption, subset.caption_suffix)
    return " ".join(p.strip() for p in parts if p and p.strip())


def tag_counts(captions) -> dict[str, int]:
    """How many captions mention each comma-separated tag (lowercased), for ss_tag_frequency."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(CAPTION_SEPARATOR):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts

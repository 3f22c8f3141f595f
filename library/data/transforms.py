"""Turning a file into a training tensor, and a caption into the text the model sees.

All randomness comes from the numpy Generator passed in, which the group seeds per batch, so a
batch is the same whether it is built in the main process, a worker, or after a resume.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from library.data.buckets import Placement
from library.data.masks import load_conditioning, load_rgba
from library.data.probe import load_rgb

CAPTION_SEPARATOR = ","      # kohya's default --caption_separator; tags are joined with ", "
COLOR_AUG_PROBABILITY = 0.33  # kohya's color_aug changes about a third of the images
HUE_SHIFT_MAX = 8            # in OpenCV hue units (0..180), i.e. +-16 degrees
GAMMA_RANGE = (0.95, 1.05)


def crop_origin(placement: Placement, rng: np.random.Generator | None = None,
                random_crop: bool = False) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in the resized image: centred, or random. Drawn once
    per image, so its masks are cut from the same window."""
    rw, rh = placement.resized
    bw, bh = placement.bucket
    extra_x, extra_y = rw - bw, rh - bh
    if random_crop and rng is not None:
        return int(rng.integers(0, extra_x + 1)), int(rng.integers(0, extra_y + 1))
    return extra_x // 2, extra_y // 2


# --resize_interpolation names (kohya's library/utils.get_cv2_interpolation / get_pil_interpolation):
# lanczos and box resize with PIL, the others with OpenCV, as kohya's resize_image does.
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_CV2_INTERPOLATION = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                      "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


def resize_to(arr: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize an HxW(xC) uint8 array to (w, h), with a --resize_interpolation method or the default."""
    h, w = arr.shape[:2]
    rw, rh = size
    if (rw, rh) == (w, h):
        return arr
    if interpolation in ("lanczos", "box"):
        from PIL import Image

        method = Image.Resampling.LANCZOS if interpolation == "lanczos" else Image.Resampling.BOX
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((rw, rh), method))
    if interpolation is not None:
        return cv2.resize(np.ascontiguousarray(arr), (rw, rh), interpolation=_CV2_INTERPOLATION[interpolation])
    # INTER_AREA averages source pixels when shrinking (no aliasing); Lanczos is sharpest up.
    interp = cv2.INTER_AREA if rw * rh < w * h else cv2.INTER_LANCZOS4
    return cv2.resize(np.ascontiguousarray(arr), (rw, rh), interpolation=interp)


def fit(arr: np.ndarray, placement: Placement, origin: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to cover the bucket and cut the bucket-sized window at `origin`."""
    arr = resize_to(arr, placement.resized, interpolation)
    (left, top), (bw, bh) = origin, placement.bucket
    return arr[top:top + bh, left:left + bw]


def resize_and_crop(arr: np.ndarray, placement: Placement, rng: np.random.Generator | None = None,
                    random_crop: bool = False) -> np.ndarray:
    """Resize an HxWx3 uint8 image to cover the bucket, then crop to it (centered unless random)."""
    return fit(arr, placement, crop_origin(placement, rng, random_crop))


def color_jitter(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kohya's weak colour augmentation: a third of the time, either a hue shift or a gamma change,
    so colours vary without changing what is shown."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return arr
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2HSV)
        shift = int(round(rng.uniform(-HUE_SHIFT_MAX, HUE_SHIFT_MAX)))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    # kohya raises the 0..255 values to the power gamma and clips: a brightness change that
    # leaves black black.
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.clip(arr.astype(np.float32) ** gamma, 0, 255).astype(np.uint8)


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
    return load_sample(path, placement, rng, random_crop=random_crop, flip=flip, color_aug=color_aug)[0]


def load_sample(path: str, placement: Placement, rng: np.random.Generator | None = None, *,
                random_crop=False, flip=False, color_aug=False, alpha=False,
                conditioning: str | None = None, interpolation: str | None = None):
    """The image and its loss masks with the same resize, crop and flip:
    (HxWx3 uint8, alpha HxW uint8 or None, conditioning image HxWx3 uint8 or None).

    The random draws are the same whatever masks are asked for (crop, then colour), so turning
    masks on does not change the crops or colours of a seeded run.
    """
    if alpha:
        rgba = np.asarray(load_rgba(path))
        arr, alpha_plane = rgba[..., :3], rgba[..., 3]
    else:
        arr, alpha_plane = np.asarray(load_rgb(path)), None
    size = (arr.shape[1], arr.shape[0])
    origin = crop_origin(placement, rng, random_crop)
    arr = fit(arr, placement, origin, interpolation)
    if alpha_plane is not None:
        alpha_plane = fit(alpha_plane, placement, origin, interpolation)
    cond = fit(load_conditioning(conditioning, size), placement, origin, interpolation) if conditioning else None
    if flip:
        arr = arr[:, ::-1]
        alpha_plane = None if alpha_plane is None else alpha_plane[:, ::-1]
        cond = None if cond is None else cond[:, ::-1]
    if color_aug and rng is not None:  # colour changes the picture only, never a mask
        arr = color_jitter(arr, rng)
    return arr, alpha_plane, cond


def _tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def process_caption(caption: str, subset, rng: np.random.Generator | None, epoch: int = 0) -> str:
    """The caption the model sees, in kohya's order: prefix/suffix, whole-caption dropout, then the
    tag ops (fixed/flexible split, shuffle, tag dropout), then the secondary separator.

    The prefix and suffix are joined to the caption first, as kohya does, so they belong to the
    first and last tags (and count towards keep_tokens). `epoch` is 0-based;
    caption_dropout_every_n_epochs counts epochs from 1 as kohya does. With rng=None nothing
    random happens (used to list the captions for the text-encoder cache).
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    every = subset.caption_dropout_every_n_epochs
    if every > 0 and (epoch + 1) % every == 0:
        return ""
    # Draw only when the option is on, so turning it off does not change other random choices.
    if subset.caption_dropout_rate > 0 and rng is not None and rng.random() < subset.caption_dropout_rate:
        return ""
    caption = caption.split("\n")[0]  # kohya trains on the first line (metadata captions may have more)

    sep, marker = subset.caption_separator, subset.keep_tokens_separator
    tag_ops = rng is not None and (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0)
    # The keep_tokens_separator marks "fixed ||| shuffled ||| fixed suffix". kohya leaves the
    # marker in the text when no tag op runs; it is removed here too, since it is markup and
    # never meant to be trained on.
    if tag_ops or (marker and marker in caption):
        if marker and marker in caption:
            fixed_text, flex_text = caption.split(marker, 1)
            flex_text, _, suffix_text = flex_text.partition(marker)
            fixed, flex, fixed_suffix = _tags(fixed_text, sep), _tags(flex_text, sep), _tags(suffix_text, sep)
        else:
            tags = _tags(caption, sep)
            keep = max(0, subset.keep_tokens)
            fixed, flex, fixed_suffix = tags[:keep], tags[keep:], []
        if tag_ops and subset.shuffle_caption:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if tag_ops and subset.caption_tag_dropout_rate > 0:
            drops = rng.random(len(flex))
            flex = [t for t, r in zip(flex, drops) if r >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)
    if subset.secondary_separator:
        # Tags joined by the secondary separator move and drop together; afterwards they read as
        # ordinary tags.
        caption = caption.replace(subset.secondary_separator, sep)
    return caption


def tag_counts(captions) -> dict[str, int]:
    """How many captions mention each comma-separated tag (lowercased), for ss_tag_frequency."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(CAPTION_SEPARATOR):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts

"""Loss masks for --masked_loss, kohya's two sources:

- `alpha_mask` (subset key, or `--alpha_mask`): the image's alpha channel; opaque = train,
  transparent = ignore. Images without alpha in such a subset are fully opaque (mask of ones).
- `conditioning_data_dir` (subset key, or `--conditioning_data_dir` with `--masked_loss`): a mask
  image with the same name (any image extension) per training image; its red channel is the mask,
  white = train. Every training image of such a subset must have one: a missing one stops the run
  before training, with the list.

A mask gets the same resize, crop and flip as its image (library.data.transforms.load_sample).
Batches carry `alpha_masks` [B, H, W] in 0..1 or `conditioning_images` [B, 3, H, W] in -1..1 at
the bucket's pixel size; library.training.losses reads them. Masks are uint8 until they are
batched, so cached (library.data.latents) and uncached runs give identical masks.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.probe import probe_images
from library.data.scan import Findings, list_images

ALPHA_KEY, CONDITIONING_KEY = "alpha_masks", "conditioning_images"  # batch keys (losses.mask_from_batch)
ASPECT_TOLERANCE = 0.01  # a mask may be another size than its image, not another shape
MAX_NAMES = 20


def load_rgba(path: str) -> Image.Image:
    """The image upright in RGBA; without an alpha channel it is opaque everywhere. The colour of
    transparent pixels is kept as stored (not blended onto a background), as kohya does."""
    with Image.open(path) as img:
        img.load()
        from library.data.probe import to_8bit

        img = to_8bit(ImageOps.exif_transpose(img))
        return img if img.mode == "RGBA" else img.convert("RGBA")


def load_conditioning(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask image as HxWx3 uint8, resized to its training image's (w, h) so one crop fits both."""
    from library.data.probe import load_rgb
    from library.data.transforms import resize_to

    return resize_to(np.asarray(load_rgb(path)), size)


def dataset_mask_kinds(config) -> tuple[bool, bool]:
    """(alpha masks, mask images): which masks the batches of a dataset carry."""
    return (any(s.alpha_mask for s in config.subsets),
            any(s.conditioning_data_dir for s in config.subsets))


def _names(paths: list[str]) -> str:
    shown = ", ".join(os.path.basename(p) for p in paths[:MAX_NAMES])
    return shown + (f", ... and {len(paths) - MAX_NAMES} more" if len(paths) > MAX_NAMES else "")


def match_conditioning(scanned, image_sizes: dict, findings: Findings, workers=None) -> dict[str, str]:
    """{image path: mask image path} for every subset with conditioning_data_dir. Missing folders,
    images without a mask, unreadable masks and masks of another shape go to `findings`."""
    matches: dict[str, str] = {}
    for sub in scanned:
        folder = sub.config.conditioning_data_dir
        if not folder or not sub.paths:
            continue
        if not os.path.isdir(folder):
            findings.error(f"the conditioning_data_dir {folder} (mask images for {sub.config.image_dir}) does not "
                           "exist.", folder)
            continue
        by_stem: dict[str, str] = {}
        for path in list_images(folder):  # sorted: a.png wins over a.webp, every run the same
            by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
        missing = []
        for image in sub.paths:
            found = by_stem.get(os.path.splitext(os.path.basename(image))[0])
            if found is None:
                missing.append(image)
            else:
                matches[image] = found
        if missing:
            findings.error(f"{len(missing)} image(s) of {sub.config.image_dir} have no mask image with the same "
                           f"name in the conditioning_data_dir {folder}: {_names(missing)}; add a mask for each "
                           "(white = train, black = ignore)", folder)
    probed = probe_images(sorted(set(matches.values())), workers)
    for image, mask in matches.items():
        size, reason = probed[mask]
        if size is None:
            findings.error(f"the mask image {mask}: {reason}.", mask)
            continue
        image_size = image_sizes.get(image)
        if image_size is not None and abs(size[0] / size[1] - image_size[0] / image_size[1]) > \
                ASPECT_TOLERANCE * image_size[0] / image_size[1]:
            findings.error(f"the mask image {mask} is {size[0]}x{size[1]} but its image {image} is "
                           f"{image_size[0]}x{image_size[1]}; a mask must have its image's aspect ratio.", mask)
    return matches


# --- batching ----------------------------------------------------------------------------------------

def _torch(arr: np.ndarray) -> torch.Tensor:
    """A tensor owning its data (arrays viewing a PIL image are read-only, which torch warns about)."""
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def alpha_tensor(plane: np.ndarray | torch.Tensor | None, bucket: tuple[int, int]) -> torch.Tensor:
    """uint8 HxW alpha -> float HxW in 0..1; None (an image outside an alpha subset) -> ones."""
    if plane is None:
        return torch.ones(bucket[1], bucket[0])
    t = plane if isinstance(plane, torch.Tensor) else _torch(plane)
    return t.float() / 255.0


def conditioning_tensor(image: np.ndarray | torch.Tensor | None, bucket: tuple[int, int]) -> torch.Tensor:
    """uint8 HxWx3 (or cached 3xHxW) -> float 3xHxW in -1..1; None -> white (train everywhere)."""
    if image is None:
        return torch.ones(3, bucket[1], bucket[0])
    t = image if isinstance(image, torch.Tensor) else _torch(image).permute(2, 0, 1)
    return t.float() / 127.5 - 1.0


def to_cache(alpha: np.ndarray | None, cond: np.ndarray | None) -> dict[str, torch.Tensor]:
    """Masks as compact uint8 tensors for the latent cache (alpha HxW, conditioning 3xHxW)."""
    out = {}
    if alpha is not None:
        out[ALPHA_KEY] = _torch(alpha).clone()
    if cond is not None:
        out[CONDITIONING_KEY] = _torch(cond).permute(2, 0, 1).contiguous()
    return out

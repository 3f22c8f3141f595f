"""The toy world of paired modalities: registered image pairs that share structure, not appearance.

Each pair shows the same random "vessels" (two soft line segments) and the same "optic disc" (a
disc). Modality "cf" (colour fundus): orange background, dark-red vessels, pale-yellow disc.
Modality "fa" (fluorescein angiography): dark background, bright vessels, bright disc, stored as a
grayscale PNG (the loader must turn it into 3 channels). The vessel contrast is inverted between
the two, as in real CF/FA pairs, so only the *position* of edges is shared, never their sign.

This is the world of our first paired experiment (docs/train_dual_unet.md; 32 px, vessel width 2.4 px, disc
radius 4 px, scaled with the image size). Nothing here is tuned to make the structure loss look
good: the recipe is the measured one. Every function takes a seed: the same seed, the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODALITIES = ("cf", "fa")
CF_BACKGROUND = (0.85, 0.45, 0.15)
CF_VESSEL = (0.45, 0.08, 0.05)
CF_DISC = (0.98, 0.90, 0.60)
FA_BACKGROUND = 0.08
FA_VESSEL = 0.85
FA_DISC = 0.95
# The toy base's own world (library/dual_unet/toy_base.py): the same structures in plain greys, so
# the base knows where vessels and discs go but neither modality's look; each LoRA learns one look.
NEUTRAL_BACKGROUND, NEUTRAL_VESSEL, NEUTRAL_DISC = 0.5, 0.3, 0.8


@dataclass(frozen=True)
class Layout:
    """The shared structure of one pair, in pixels."""
    vessels: tuple  # ((x0, y0, x1, y1), ...)
    disc: tuple  # (cx, cy, radius)
    width: float  # vessel width
    brightness: float  # per-pair illumination factor (both modalities)


def random_layout(rng: np.random.Generator, size: int) -> Layout:
    scale = size / 32
    vessels = []
    for _ in range(2):
        # endpoints on two different sides, so every vessel crosses the image
        sides = rng.choice(4, 2, replace=False)
        points = []
        for side in sides:
            t = rng.uniform(0.1, 0.9) * size
            points += {0: [t, 0.0], 1: [t, size], 2: [0.0, t], 3: [size, t]}[int(side)]
        vessels.append(tuple(float(p) for p in points))
    radius = 4.0 * scale
    cx, cy = rng.uniform(radius + 2 * scale, size - radius - 2 * scale, 2)
    return Layout(tuple(vessels), (float(cx), float(cy), radius), 2.4 * scale, float(rng.uniform(0.9, 1.1)))


def _segment_coverage(xx, yy, seg, width) -> np.ndarray:
    x0, y0, x1, y1 = seg
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    return np.clip(width / 2 + 0.5 - dist, 0, 1)  # a one-pixel soft edge (band-limited for the VAE)


def masks(layout: Layout, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(vessel coverage, disc coverage), each HxW in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    vessel = np.zeros((size, size), np.float32)
    for seg in layout.vessels:
        vessel = np.maximum(vessel, _segment_coverage(xx, yy, seg, layout.width))
    cx, cy, r = layout.disc
    disc = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)
    return vessel, disc


def render_pair(layout: Layout, size: int, rng: np.random.Generator | None = None):
    """(cf HxWx3, fa HxW) float32 in [0, 1]."""
    vessel, disc = masks(layout, size)
    v, d = vessel[..., None], disc[..., None]
    cf = np.asarray(CF_BACKGROUND, np.float32) * layout.brightness
    cf = cf * (1 - v) + np.asarray(CF_VESSEL, np.float32) * v
    cf = cf * (1 - d) + np.asarray(CF_DISC, np.float32) * d
    fa = FA_BACKGROUND * (1 - vessel) + FA_VESSEL * layout.brightness * vessel
    fa = fa * (1 - disc) + FA_DISC * disc
    if rng is not None:  # a little sensor noise, independent per modality
        cf = cf + rng.normal(0, 0.01, cf.shape)
        fa = fa + rng.normal(0, 0.01, fa.shape)
    return np.clip(cf, 0, 1).astype(np.float32), np.clip(fa, 0, 1).astype(np.float32)


def render_neutral(layout: Layout, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The base world's grey rendering of a layout, HxWx3 float32 in [0, 1]."""
    vessel, disc = masks(layout, size)
    grey = NEUTRAL_BACKGROUND * layout.brightness * (1 - vessel) + NEUTRAL_VESSEL * vessel
    grey = grey * (1 - disc) + NEUTRAL_DISC * disc
    if rng is not None:
        grey = grey + rng.normal(0, 0.01, grey.shape)
    return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1).astype(np.float32)


def neutral_images(count: int, seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_neutral(random_layout(rng, size), size, rng) for _ in range(count)])


def pair_images(count: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`count` pairs as float32 NHWC in [0, 1]: (cf [N,H,W,3], fa [N,H,W,3], grey repeated)."""
    rng = np.random.default_rng(seed)
    cfs, fas = [], []
    for _ in range(count):
        cf, fa = render_pair(random_layout(rng, size), size, rng)
        cfs.append(cf)
        fas.append(np.repeat(fa[..., None], 3, axis=-1))
    return np.stack(cfs), np.stack(fas)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def write_pair_dataset(root, count: int = 64, seed: int = 0, size: int = 32) -> Path:
    """root/cf/0000.png (RGB) and root/fa/0000.png (grayscale) ...: the --data_dir layout."""
    from PIL import Image

    from library.fileio import atomic_path

    root = Path(root)
    cf, fa = pair_images(count, seed, size)
    for name, images in (("cf", cf), ("fa", fa[..., 0])):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            with atomic_path(root / name / f"{i:04d}.png") as tmp:
                Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
    return root

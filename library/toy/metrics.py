"""Colour statistics of toy-world images: how much of a palette colour an image shows.

`colour_excess(images, "green")` is the mean over pixels of how far the colour's strong channels
rise above its weak ones (green: G - max(R, B), clipped at 0). Grey backgrounds score 0 for every
colour, so the statistic measures the drawn shape only; it is continuous, so the blurry samples of
a tiny model still move it smoothly, and it needs no threshold or detector.
"""
from __future__ import annotations

import numpy as np
import torch

from library.toy.world import COLOURS


def _channels(name: str) -> tuple[list[int], list[int]]:
    rgb = COLOURS[name]
    high = [i for i, v in enumerate(rgb) if v > 0.5]
    low = [i for i, v in enumerate(rgb) if v <= 0.5]
    return high, low


def as_float_nhwc(images) -> np.ndarray:
    """uint8 or float images, NHWC or NCHW (a torch tensor from a pipeline) -> float NHWC in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.shape[-1] != 3 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def colour_excess_per_image(images, name: str) -> np.ndarray:
    """Per image: mean over pixels of max(0, min(strong channels) - max(weak channels))."""
    x = as_float_nhwc(images)
    high, low = _channels(name)
    excess = x[..., high].min(-1) - x[..., low].max(-1)
    return np.maximum(excess, 0.0).mean(axis=(1, 2))


def colour_excess(images, name: str) -> float:
    """The mean of `colour_excess_per_image` over the images."""
    return float(colour_excess_per_image(images, name).mean())


def dominant_colours(images, names=tuple(COLOURS)) -> list[str]:
    """Per image, the palette colour with the largest excess (what colour the shape was drawn in)."""
    scores = np.stack([colour_excess_per_image(images, n) for n in names], axis=1)
    return [names[i] for i in scores.argmax(axis=1)]

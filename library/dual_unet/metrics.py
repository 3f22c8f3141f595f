"""Pixel-space measures of generated pairs: do they share structure, do they look like their modality.

edge correlation: Pearson correlation of the Sobel edge-magnitude maps (grayscale, border trimmed)
of the two images of a pair. Contrast-sign blind, so an inverted-contrast vessel still counts.
Compared between pairs from the same initial noise and pairs from independent noise (chance).

redness: mean over pixels of R - B. Colour fundus (orange/red) scores high, grayscale angiography
0; any two modalities that differ in colour can use it, or `channel_means` for a full picture.
"""
from __future__ import annotations

import numpy as np
import torch

from library.dual_unet.losses import edge_map


def as_nchw(images) -> torch.Tensor:
    """uint8/float NHWC (numpy) or NCHW (torch) -> float NCHW in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        return x if x.shape[1] in (1, 3) else x.permute(0, 3, 1, 2)
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def gray_edges(images, border: int = 2) -> torch.Tensor:
    """[N, H-2b, W-2b] edge magnitudes of the luma; the border is cut (padding makes false edges)."""
    x = as_nchw(images)
    if x.shape[1] == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    e = edge_map(x)[:, 0]
    return e[:, border:e.shape[1] - border, border:e.shape[2] - border] if border else e


def edge_correlation(images_a, images_b) -> np.ndarray:
    """Per pair, the correlation of the two images' edge maps (0 where one image is flat)."""
    ea, eb = gray_edges(images_a).flatten(1).double(), gray_edges(images_b).flatten(1).double()
    ea = ea - ea.mean(1, keepdim=True)
    eb = eb - eb.mean(1, keepdim=True)
    den = (ea.norm(dim=1) * eb.norm(dim=1)).clamp_min(1e-12)
    return ((ea * eb).sum(1) / den).numpy()


def redness(images) -> np.ndarray:
    """Per image, mean(R - B) in [-1, 1]."""
    x = as_nchw(images)
    return (x[:, 0] - x[:, 2]).mean(dim=(1, 2)).numpy()


def channel_means(images) -> np.ndarray:
    """Per image, the mean of each channel [N, 3]."""
    return as_nchw(images).mean(dim=(2, 3)).numpy()


def separation_accuracy(score_a: np.ndarray, score_b: np.ndarray) -> float:
    """Share of images a threshold halfway between the two means puts on their own side."""
    mid = (score_a.mean() + score_b.mean()) / 2
    sign = 1.0 if score_a.mean() >= score_b.mean() else -1.0
    right = np.concatenate([sign * (score_a - mid) > 0, sign * (score_b - mid) < 0])
    return float(right.mean())

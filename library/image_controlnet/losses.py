"""Losses and the PSNR metric. Every function returns one value per sample ([B]), so the training
step can weigh samples by 1 / (samples in the accumulation group): k micro-batches of b then add up
to exactly the gradient of one batch of k*b, whatever the size of the last batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from library.image_controlnet.model import POSE_SCALE

LOSS_TYPES = ("mse", "l1", "combined")


def image_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-sample image loss on [-1, 1] images. "combined" = (MSE + L1) / 2: the mean keeps its scale
    comparable with the single losses, so --lr and --pose_loss_weight need no retuning."""
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).flatten(1).mean(1)
    if loss_type == "mse":
        return mse
    l1 = (pred - target).abs().flatten(1).mean(1)
    if loss_type == "l1":
        return l1
    if loss_type == "combined":
        return 0.5 * (mse + l1)
    raise ValueError(f"unknown loss type {loss_type!r}")


def pose_loss(pred_scaled: torch.Tensor, target_deg: torch.Tensor) -> torch.Tensor:
    """Per-sample smooth-L1 between the pose head's output and the target, both in units of 45 deg."""
    return F.smooth_l1_loss(pred_scaled.float(), target_deg.float() / POSE_SCALE, reduction="none").mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB for images in [-1, 1] (peak-to-peak 2, so MAX^2 = 4); pred is clamped."""
    mse = (pred.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))

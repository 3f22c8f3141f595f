"""Heatmap-weighted diffusion loss: more weight where the condition says a target is.

The condition (pixels) is brought to latent size by max pooling, so a Gaussian of sigma 8 px
keeps its peak of 1 on the 1/8 grid, then dilated by one latent pixel (kohya's masked-loss note:
a target a few pixels wide would otherwise weigh on a single latent cell or fall between cells).

    w = 1 + factor * H_lat                      (per latent pixel, same for the 4 channels)
    w = w * (|pred - target| + eps) ** gamma    (--use_focal_loss; the error is detached: a re-weighting
                                                 of the MSE towards badly denoised pixels, as focal
                                                 losses do, since there is no probability output here)
    loss per sample = sum(w * l) / sum(w)       (l = the elementwise loss, MSE by default)

Normalising by sum(w) keeps the loss on the scale of the plain loss, so learning rates carry over
and factor 0 is the plain loss. With factor 0 and no focal term the shared objective's own loss is
returned unchanged (bit for bit what train_network computes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from library.training import losses

FOCAL_EPS = 1e-3


def latent_weight_source(heat: torch.Tensor, latent_hw: tuple[int, int], dilate: int = 1) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1] at pixel size -> [B, 1, h, w] at latent size (max pool, then dilate)."""
    heat = heat.float()
    if tuple(heat.shape[-2:]) != tuple(latent_hw):
        heat = F.adaptive_max_pool2d(heat, latent_hw)
    if dilate > 0:
        heat = F.max_pool2d(heat, 2 * dilate + 1, stride=1, padding=dilate)
    return heat


def weight_map(heat_lat: torch.Tensor, factor: float) -> torch.Tensor:
    return 1.0 + float(factor) * heat_lat


def weighted_loss(objective, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, batch: dict,
                  heat_lat: torch.Tensor | None, factor: float, focal_gamma: float | None = None) -> torch.Tensor:
    """The batch's scalar loss with heatmap weighting; the shared objective's loss when it is off."""
    if (not factor or heat_lat is None) and not focal_gamma:
        return objective.loss(pred, target, timesteps, batch)
    s = objective.s
    huber_c = None
    if s.loss_type in ("huber", "smooth_l1"):
        huber_c = losses.huber_threshold(s.huber_schedule, s.huber_c, s.huber_scale, timesteps,
                                         objective.alphas_cumprod, objective.num_train_timesteps)
    elementwise = losses.elementwise_loss(pred.float(), target.float(), s.loss_type, huber_c)
    w = torch.ones_like(elementwise[:, :1])
    if factor and heat_lat is not None:
        w = weight_map(heat_lat.to(elementwise.device), factor).expand_as(w)
    w = w.expand_as(elementwise)
    if focal_gamma:
        w = w * ((pred.float() - target.float()).abs().detach() + FOCAL_EPS) ** float(focal_gamma)
    dims = tuple(range(1, elementwise.dim()))
    per_sample = (w * elementwise).sum(dim=dims) / w.sum(dim=dims)
    weights = batch.get("loss_weights")
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    step_weights = objective.timestep_weights(timesteps)
    if step_weights is not None:
        per_sample = per_sample * step_weights
    return per_sample.mean()

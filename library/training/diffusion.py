"""Noise, timesteps, the prediction target and the loss of one diffusion training step."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float | None = None):
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # A per-channel constant shift lets the model learn overall brightness (Crosslabs' noise offset).
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                            device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * shift
    return noise


def sample_timesteps(batch_size: int, scheduler, generator: torch.Generator, device,
                     min_timestep: int | None = None, max_timestep: int | None = None) -> torch.Tensor:
    low = min_timestep or 0
    high = max_timestep or scheduler.config.num_train_timesteps
    return torch.randint(low, high, (batch_size,), generator=generator, device=device).long()


def prediction_target(scheduler, latents, noise, timesteps, v_parameterization: bool = False):
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE per sample, computed in fp32 whatever the model's dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()

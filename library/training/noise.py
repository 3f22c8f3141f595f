"""The noise a training step adds, and the timesteps it is added at (kohya's options).

All randomness comes from the generator passed in (the trainer's noise generator, saved in the
state folder), except multires noise's per-level scale factors, which come from Python's `random`
as in kohya: they decide tensor shapes, so they must be host numbers, and drawing them from a GPU
generator would cost a host sync every step. Python's RNG is saved in the state folder too, so a
resumed run draws the same factors.
"""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

# The share of a global batch this process trains on (a library.data.loader.Shard), set by the
# training loop around each loss computation when several processes share the batches.
_shard = None


@contextlib.contextmanager
def drawing_for(shard):
    """Draw the noise of the whole global batch and keep `shard`'s part of it (None: the batch is
    all there is). Every process holds the same noise generator, so the processes together use
    exactly the noise one process with the whole batch would draw, and each its own part of it."""
    global _shard
    previous, _shard = _shard, shard
    try:
        yield
    finally:
        _shard = previous


def current_shard():
    return _shard


def randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def random_strength(value: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """value * U(0, 1), one draw per batch (kohya's *_random_strength); stays on the device."""
    return torch.rand((1,), generator=generator, device=like.device, dtype=like.dtype) * value


def offset_noise(latents: torch.Tensor, noise: torch.Tensor, offset, generator: torch.Generator,
                 adaptive_scale: float | None = None) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (Crosslabs' noise offset).

    A constant shift lets the model change an image's overall brightness, which plain noise never
    asks it to do. With `adaptive_scale` the offset grows with the latent's mean per channel
    (kohya's --adaptive_noise_scale), never below 0.
    """
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_scale * channel_mean, min=0.0)
    shift = randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator,
                  rng: random.Random | None = None) -> torch.Tensor:
    """Multires (pyramid) noise: add upsampled low-resolution noise, level i weighted discount**i.

    Each level shrinks by a random factor in [2, 4) (not always 2, so levels do not line up), down
    to 1x1 at most; the sum is rescaled to unit standard deviation.
    """
    rng = rng or random
    b, c, h, w = noise.shape
    out = noise
    for i in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator, device=noise.device, dtype=noise.dtype)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(batch_size: int, low: int, high: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform integer timesteps in [low, high)."""
    return torch.randint(low, high, (batch_size,), generator=generator, device=device).long()


def zero_terminal_snr_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod rescaled so the last timestep is pure noise (Lin et al. 2023, arXiv 2305.08891).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is kept.
    """
    sqrt_ac = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    return (sqrt_ac**2).to(betas.dtype)

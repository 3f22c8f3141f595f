"""Loss functions and per-sample weights of a diffusion training step (kohya's options).

Everything here is vectorised over the batch and stays on the device: per-timestep tables are
indexed with the timestep tensor, never with Python numbers, so a step has no host sync.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0  # SNR at t=0 is huge (inf on some schedules); kohya caps it here for the scale terms


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss [B, C, H, W]. huber/smooth_l1 are the pseudo-Huber form kohya uses, with a
    per-sample threshold c [B]: huber = 2c(sqrt(d^2 + c^2) - c), smooth_l1 = 2(sqrt(d^2 + c^2) - c)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.view(-1, *([1] * (pred.dim() - 1))).to(pred.dtype)
        # sqrt(d^2 + c^2) - c written as d^2 / (sqrt(d^2 + c^2) + c): the same value without the
        # cancellation that costs float32 0.1% of a small error's loss (kohya's formula, rearranged)
        d2 = (pred - target) ** 2
        soft = d2 / (torch.sqrt(d2 + c**2) + c)
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"unknown loss type {loss_type!r}")


def huber_threshold(schedule: str, c: float, scale: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The Huber threshold per sample [B] for --huber_schedule (kohya's three schedules).

    constant: c * scale. exponential: scale * c**(t / T), from `scale` at t=0 down to c*scale at
    t=T. snr: (1 - c) / (1 + sigma_t)**2 + c with sigma_t = sqrt((1 - abar_t) / abar_t): near 1
    (almost L2) for clean inputs, near c (robust) for noisy ones; kohya does not apply scale here.
    """
    t = timesteps.to(alphas_cumprod.device)
    if schedule == "constant":
        return torch.full(t.shape, c * scale, device=t.device, dtype=torch.float32)
    if schedule == "exponential":
        alpha = -math.log(c) / num_train_timesteps
        return torch.exp(-alpha * t.float()) * scale
    if schedule == "snr":
        abar = alphas_cumprod[t]
        sigmas = ((1.0 - abar) / abar) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    raise ValueError(f"unknown Huber schedule {schedule!r}")


# --- masks ---------------------------------------------------------------------------------------

def mask_from_batch(batch: dict) -> torch.Tensor | None:
    """The loss mask of a batch as [B, 1, H, W] in [0, 1], or None; kohya's two sources:

    - batch["conditioning_images"]: [B, 3, H, W] in [-1, 1] (a --conditioning_data_dir image per
      training image); the red channel is the mask, white = train, black = ignore.
    - batch["alpha_masks"]: [B, H, W] in [0, 1] (the images' alpha channel, --alpha_mask).
    """
    cond = batch.get("conditioning_images")
    if cond is not None:
        return cond[:, :1].float() / 2 + 0.5
    alpha = batch.get("alpha_masks")
    if alpha is not None:
        alpha = alpha.float()
        return alpha.unsqueeze(1) if alpha.dim() == 3 else alpha
    return None


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply an unreduced loss by a mask area-resized to its size (pixel masks -> latent size).

    As in kohya the masked loss is then averaged over all positions, not only the unmasked ones, so
    a half-masked image contributes about half the loss of an unmasked one.
    """
    mask = mask.to(device=loss.device, dtype=loss.dtype, non_blocking=True)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


# --- per-timestep weights (min-SNR, debiased, v-prediction scaling) -------------------------------

def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) for every timestep."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for noise prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction. Written as min(1, gamma / SNR) for noise
    prediction, which is the same number but stays finite (1) where SNR is 0."""
    if v_prediction:
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


def v_pred_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) with SNR capped at 1000: makes a v-prediction loss weigh timesteps like a
    noise-prediction loss (--scale_v_pred_loss_like_noise_pred; --v_pred_like_loss divides by it)."""
    snr = torch.clamp(snr, max=SNR_CAP)
    return snr / (snr + 1)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1 / sqrt(SNR) for noise prediction, 1 / (SNR + 1) for
    v-prediction, SNR capped at 1000 as in kohya."""
    snr = torch.clamp(snr, max=SNR_CAP)
    return 1.0 / (snr + 1) if v_prediction else torch.rsqrt(snr)

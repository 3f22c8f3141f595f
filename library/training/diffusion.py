"""One diffusion training step's noise, timesteps, target and loss, with kohya's options.

`DiffusionObjective(args, noise_scheduler, device)` reads the flags once and precomputes the
per-timestep tables on the device; a trainer's loss function then is

    noise, noisy, timesteps = objective.noisy_latents(latents, generator)
    pred = unet(noisy, timesteps, text).sample
    loss = objective.loss(pred, objective.target(latents, noise, timesteps), timesteps, batch)

With every option off this is plain epsilon-prediction MSE, bit for bit. The model's scheduler is
never modified (sampling keeps using it); --zero_terminal_snr changes this object's own copy of
the schedule.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch

from library.errors import UserError
from library.logs import warn_once
from library.training import losses
from library.training import noise as noise_mod


@dataclass
class LossSettings:
    """The loss/noise/timestep flags (kohya names and defaults); absent flags count as off."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    masked_loss: bool = False

    @classmethod
    def from_args(cls, args) -> "LossSettings":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)
                      if getattr(args, f.name, None) is not None})


def check_loss_arguments(args, num_train_timesteps: int = 1000) -> LossSettings:
    """kohya's checks of the loss/noise flags; call before any long work. Returns the settings."""
    s = LossSettings.from_args(args)
    if s.adaptive_noise_scale is not None and not s.noise_offset:
        raise UserError("--adaptive_noise_scale adds to the noise offset, but --noise_offset is not set.",
                        fix="add --noise_offset (e.g. 0.05), or drop --adaptive_noise_scale.")
    if s.scale_v_pred_loss_like_noise_pred and not s.v_parameterization:
        raise UserError("--scale_v_pred_loss_like_noise_pred only applies to v-prediction training.",
                        fix="add --v_parameterization (for a v-prediction model), or drop the flag.")
    if s.v_pred_like_loss and s.v_parameterization:
        raise UserError("--v_pred_like_loss adds a v-prediction-like loss to noise-prediction training; it "
                        "cannot be combined with --v_parameterization.",
                        fix="drop --v_pred_like_loss or --v_parameterization.")
    if s.min_timestep is not None and s.min_timestep >= num_train_timesteps:
        raise UserError(f"--min_timestep must be below {num_train_timesteps} (got {s.min_timestep}).",
                        fix=f"pass a value between 0 and {num_train_timesteps - 1}.")
    if s.max_timestep is not None and s.max_timestep > num_train_timesteps:
        raise UserError(f"--max_timestep must be at most {num_train_timesteps} (got {s.max_timestep}).",
                        fix=f"pass a value between 1 and {num_train_timesteps}.")
    if (s.min_timestep or 0) >= (num_train_timesteps if s.max_timestep is None else s.max_timestep):
        raise UserError("--min_timestep must be smaller than --max_timestep.", fix="correct one of them.")
    if s.zero_terminal_snr and not s.v_parameterization:
        warn_once("--zero_terminal_snr without --v_parameterization: the last timestep is pure noise, "
                  "which a noise-prediction model cannot learn; kohya warns that results will be unexpected.")
    return s


class DiffusionObjective:
    def __init__(self, args, noise_scheduler, device, rng: random.Random | None = None):
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.s = s = check_loss_arguments(args, self.num_train_timesteps)
        self.device = torch.device(device)
        self.rng = rng  # None: Python's global random, which the state folder saves (multires noise)
        base = noise_scheduler.alphas_cumprod.detach().float().cpu()
        # As in kohya, the SNR tables for the loss weights come from the model's own schedule, built
        # before the zero-terminal-SNR fix; the last step keeps a finite weight.
        self.snr = losses.snr_table(base.double()).float().to(self.device)
        if s.zero_terminal_snr:
            base = noise_mod.zero_terminal_snr_alphas_cumprod(noise_scheduler.betas.detach().float().cpu())
        self.alphas_cumprod = base.to(self.device)
        self.sqrt_ac = base.sqrt().to(self.device)
        self.sqrt_one_minus_ac = (1.0 - base).sqrt().to(self.device)
        self.t_low = s.min_timestep or 0
        self.t_high = self.num_train_timesteps if s.max_timestep is None else s.max_timestep
        self.uses_timestep_weights = bool(s.min_snr_gamma or s.scale_v_pred_loss_like_noise_pred
                                          or s.v_pred_like_loss or s.debiased_estimation_loss)

    # --- forward process ---------------------------------------------------------------------------
    def _at(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[timesteps].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents, noise, timesteps):
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (diffusers' DDPM add_noise, tables in fp32)."""
        return self._at(self.sqrt_ac, timesteps, latents) * latents + \
            self._at(self.sqrt_one_minus_ac, timesteps, latents) * noise

    def target(self, latents, noise, timesteps):
        """What the UNet should predict: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        if not self.s.v_parameterization:
            return noise
        return self._at(self.sqrt_ac, timesteps, latents) * noise - \
            self._at(self.sqrt_one_minus_ac, timesteps, latents) * latents

    def noisy_latents(self, latents: torch.Tensor, generator: torch.Generator):
        """(noise, noisy latents, timesteps) in kohya's order of random draws.

        When this process trains on a share of a global batch (noise.drawing_for, set by the
        training loop), the draws are made for the whole batch and this share is returned, so the
        result does not depend on how many processes share the batch. One exception:
        --adaptive_noise_scale together with --multires_noise_iterations, whose final scaling by the
        whole noise's std then sees zeros for the other shares' latents (measured: a relative
        difference of about 1e-5).
        """
        shard = noise_mod.current_shard()
        if shard is None or (shard.offset == 0 and shard.total == latents.shape[0]):
            return self._noisy_latents(latents, generator)
        if latents.shape[0] != shard.count:
            raise ValueError(f"a share of {shard.count} items got latents for {latents.shape[0]}")
        full = latents.new_zeros((shard.total, *latents.shape[1:]))
        part = slice(shard.offset, shard.offset + shard.count)
        full[part] = latents  # the other items' latents only feed their own (unused) rows
        noise, noisy, timesteps = self._noisy_latents(full, generator)
        return noise[part], noisy[part], timesteps[part]

    def _noisy_latents(self, latents: torch.Tensor, generator: torch.Generator):
        s = self.s
        noise = noise_mod.randn(latents.shape, generator, latents)
        if s.noise_offset:
            offset = s.noise_offset
            if s.noise_offset_random_strength:
                offset = noise_mod.random_strength(offset, generator, latents)
            noise = noise_mod.offset_noise(latents, noise, offset, generator, s.adaptive_noise_scale)
        if s.multires_noise_iterations:
            noise = noise_mod.pyramid_noise(noise, s.multires_noise_iterations, s.multires_noise_discount,
                                            generator, self.rng)
        timesteps = noise_mod.sample_timesteps(latents.shape[0], self.t_low, self.t_high, generator,
                                               latents.device)
        noised_with = noise
        if s.ip_noise_gamma:
            # Input perturbation (Ning et al. 2023): the input gets extra noise, the target does not.
            gamma = s.ip_noise_gamma
            if s.ip_noise_gamma_random_strength:
                gamma = noise_mod.random_strength(gamma, generator, latents)
            noised_with = noise + gamma * noise_mod.randn(latents.shape, generator, latents)
        return noise, self.add_noise(latents, noised_with, timesteps), timesteps

    # --- loss --------------------------------------------------------------------------------------
    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The product of the per-timestep loss weights [B], or None when no option uses one."""
        if not self.uses_timestep_weights:
            return None
        s, snr = self.s, self.snr[timesteps]
        weight = torch.ones_like(snr)
        if s.min_snr_gamma:
            weight = weight * losses.min_snr_weight(snr, s.min_snr_gamma, s.v_parameterization)
        if s.scale_v_pred_loss_like_noise_pred:
            weight = weight * losses.v_pred_scale(snr)
        if s.v_pred_like_loss:
            # kohya adds loss / scale * k, i.e. multiplies the (already weighted) loss by 1 + k / scale
            weight = weight * (1 + s.v_pred_like_loss / losses.v_pred_scale(snr))
        if s.debiased_estimation_loss:
            weight = weight * losses.debiased_weight(snr, s.v_parameterization)
        return weight

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The batch's scalar loss: elementwise loss (fp32) -> mask -> mean per sample -> weights -> mean."""
        s = self.s
        huber_c = None
        if s.loss_type in ("huber", "smooth_l1"):
            huber_c = losses.huber_threshold(s.huber_schedule, s.huber_c, s.huber_scale, timesteps,
                                             self.alphas_cumprod, self.num_train_timesteps)
        elementwise = losses.elementwise_loss(pred.float(), target.float(), s.loss_type, huber_c)
        # As in kohya, alpha masks apply even without --masked_loss; conditioning images only with it
        # (other trainers' batches carry conditioning images that are not masks).
        if s.masked_loss or batch.get("alpha_masks") is not None:
            mask = losses.mask_from_batch(batch)
            if mask is None:
                raise UserError("--masked_loss is set but the batch has no mask.",
                                fix="use a dataset with --alpha_mask (images with transparency) or with "
                                    "--conditioning_data_dir (mask images), or drop --masked_loss.")
            elementwise = losses.apply_mask(elementwise, mask)
        per_sample = elementwise.mean(dim=tuple(range(1, elementwise.dim())))
        weights = batch.get("loss_weights")
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device, torch.float32, non_blocking=True)
        step_weights = self.timestep_weights(timesteps)
        if step_weights is not None:
            per_sample = per_sample * step_weights
        return per_sample.mean()


# --- the small functions earlier code calls (plain noise, MSE) ----------------------------------------

def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float | None = None):
    noise = noise_mod.randn(latents.shape, generator, latents)
    return noise_mod.offset_noise(latents, noise, noise_offset, generator) if noise_offset else noise


def sample_timesteps(batch_size: int, scheduler, generator: torch.Generator, device,
                     min_timestep: int | None = None, max_timestep: int | None = None) -> torch.Tensor:
    high = max_timestep or scheduler.config.num_train_timesteps
    return noise_mod.sample_timesteps(batch_size, min_timestep or 0, high, generator, device)


def prediction_target(scheduler, latents, noise, timesteps, v_parameterization: bool = False):
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE per sample, computed in fp32 whatever the model's dtype."""
    return losses.elementwise_loss(pred.float(), target.float(), "l2").mean(dim=(1, 2, 3))


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()

"""The paired training objective, shared by the training step and validation.

For each modality, independently: its own noise and its own timestep (from the objective, so
--offset_noise_strength / --noise_offset, --min_timestep, --min_snr_gamma, --loss_type ... all
apply), its own UNet + LoRA, its own noise-prediction loss. Then

    loss = mse_a + mse_b + hf_lambda * (hf_a + hf_b) + struct_lambda * struct

hf = L1 of the high frequencies of predicted vs true x0, weighted sqrt(abar_t) per sample;
struct = Sobel edge-map disagreement of the two predicted x0 latents, weighted
sqrt(abar_a * abar_b) per pair (library/dual_unet/losses.py says why). The structure term is the
only one that couples the two UNets, and its gradient reaches both LoRAs.
"""
from __future__ import annotations

import torch

from library.dual_unet import losses

TERMS = ("loss", "mse_a", "mse_b", "hf", "struct")


def paired_losses(dual, objective, latents, generator, *, hf_lambda: float, struct_lambda: float,
                  struct_kind: str = "l1") -> dict[str, torch.Tensor]:
    """{"loss", "mse_a", "mse_b", "hf", "struct"}; only "loss" carries gradients."""
    x0, abar, out = [], [], {}
    hf = 0.0
    for side, name in enumerate(("a", "b")):
        lat = latents[side]
        noise, noisy, t = objective.noisy_latents(lat, generator)
        hidden = dual.hidden[side].to(lat.device, lat.dtype).expand(len(lat), -1, -1)
        pred = dual.unets[side](noisy, t, hidden).sample
        out[f"mse_{name}"] = objective.loss(pred, objective.target(lat, noise, t), t, {})
        a = objective.alphas_cumprod[t]
        x0.append(losses.predicted_x0(noisy, pred, a, objective.s.v_parameterization))
        abar.append(a)
        hf = hf + (losses.timestep_weight(a) * losses.high_frequency_loss(x0[-1], lat)).mean()
    struct = (losses.timestep_weight(*abar) * losses.structure_loss(x0[0], x0[1], struct_kind)).mean()
    loss = out["mse_a"] + out["mse_b"]
    # A zero weight adds nothing to the graph; the term is still computed for the logs.
    if hf_lambda:
        loss = loss + hf_lambda * hf
    if struct_lambda:
        loss = loss + struct_lambda * struct
    out.update(loss=loss, hf=hf.detach(), struct=struct.detach())
    out["mse_a"], out["mse_b"] = out["mse_a"].detach(), out["mse_b"].detach()
    return out


def mean_terms(records: list[dict]) -> dict[str, float]:
    """Average each term over micro-batches / validation batches (one host sync)."""
    if not records:
        return {}
    stacked = torch.stack([torch.stack([r[k].detach().float() for k in TERMS]) for r in records]).mean(0)
    return dict(zip(TERMS, stacked.cpu().tolist()))


VALIDATION_SEED = 1234  # fixed: validation noise and timesteps are the same at every evaluation and in every run


@torch.no_grad()
def validation_losses(dual, val_group, make_objective, latents_of, device, max_batches: int | None = None,
                      **weights) -> dict[str, float]:
    """The objective on every validation pair (the first `max_batches` batches: --fast_dev_run) with
    fixed noise and timesteps (deterministic)."""
    from itertools import islice

    generator = torch.Generator(device=device).manual_seed(VALIDATION_SEED)
    objective = make_objective()
    was = [n.training for n in dual.networks]
    for network in dual.networks:
        network.eval()
    records = []
    try:
        for batch in islice(val_group.epoch_dataset(0, seed=VALIDATION_SEED), max_batches):
            records.append(paired_losses(dual, objective, latents_of(batch), generator, **weights))
    finally:
        for network, training in zip(dual.networks, was):
            network.train(training)
    return mean_terms(records)

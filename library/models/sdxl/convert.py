"""Key mapping between SDXL's original single-file layout and diffusers/transformers, both ways.

The parts reuse the SD1/SD2 mappings of library/models/convert.py, which only differ here in
their prefixes: the UNet and VAE are the same layouts (plus SDXL's `label_emb` <->
`add_embedding`), CLIP ViT-L is SD1's text encoder under `conditioner.embedders.0.transformer.`,
and bigG is SD2's OpenCLIP layout under `conditioner.embedders.1.model.`, keeping all its layers
and its text projection (the pooled output needs them). Every key maps both ways, so a round
trip is exact (tested).

bigG's `text_projection` is transposed into the Linear weight, as SDXL computes it (OpenCLIP's
`x @ P`) and as diffusers and ComfyUI read it. kohya's single-file loader (sdxl_model_util) copies
it untransposed, so kohya's pooled output from a single file is `x @ P.T`, unlike SDXL's and
unlike kohya's own from a diffusers folder: a deliberate difference from kohya.
"""
from __future__ import annotations

from library.models import arch as base_arch
from library.models import convert as base
from library.models.sdxl.arch import TE1_PREFIX, TE2_PREFIX


def unet_to_diffusers(checkpoint: dict, config: dict) -> dict:
    """UNet weights from `model.diffusion_model.*` keys (diffusers' own converter, offline)."""
    return base.unet_to_diffusers(checkpoint, config)


def text_encoder_1_to_diffusers(checkpoint: dict) -> dict:
    """CLIPTextModel weights (transformers 5 names) from `conditioner.embedders.0.transformer.*`."""
    moved = {base_arch.TEXT_ENCODER_PREFIX + k[len(TE1_PREFIX):]: v
             for k, v in checkpoint.items() if k.startswith(TE1_PREFIX)}
    return base.text_encoder_to_diffusers(moved)


def text_encoder_2_to_diffusers(checkpoint: dict) -> dict:
    """CLIPTextModelWithProjection weights from bigG's OpenCLIP keys `conditioner.embedders.1.model.*`.

    Unlike CLIPTextModel, transformers 5's CLIPTextModelWithProjection keeps the `text_model.`
    level: `text_model.encoder.*`, ..., and `text_projection.weight` beside it.
    """
    out = base.open_clip_to_diffusers(checkpoint, prefix=TE2_PREFIX, with_projection=True)
    return {k if k == "text_projection.weight" else "text_model." + k: v for k, v in out.items()}


def text_encoder_1_to_original(te_sd: dict) -> dict:
    out = base.text_encoder_to_ldm(te_sd)
    return {TE1_PREFIX + k[len(base_arch.TEXT_ENCODER_PREFIX):]: v for k, v in out.items()}


def text_encoder_2_to_original(te_sd: dict) -> dict:
    return base.text_encoder_to_open_clip(te_sd, prefix=TE2_PREFIX)


def to_original(unet_sd: dict, vae_sd: dict, te1_sd: dict, te2_sd: dict) -> dict:
    """One checkpoint dict in SDXL's original layout (what WebUI and ComfyUI load)."""
    out = base.unet_to_ldm(unet_sd)
    out.update(base.vae_to_ldm(vae_sd))
    out.update(text_encoder_1_to_original(te1_sd))
    out.update(text_encoder_2_to_original(te2_sd))
    return out

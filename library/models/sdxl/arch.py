"""SDXL's architecture: the shipped configs, configs inferred from a file's shapes, and telling
an SDXL base apart from an SDXL refiner, an SD1.x/2.x model or a LoRA by its weights.

The original single-file layout (what Stability AI, WebUI, ComfyUI and kohya write):

    model.diffusion_model.*                 UNet (input_blocks / middle_block / output_blocks, label_emb)
    conditioner.embedders.0.transformer.*   CLIP ViT-L/14 (transformers names under text_model.)
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14 (OpenCLIP names, fused attn.in_proj_*)
    first_stage_model.*                     VAE (the SD VAE's architecture; scaling factor 0.13025)

The refiner has only bigG, as `conditioner.embedders.0.model.*`, and a 384-channel UNet.
Shapes give the widths, layer counts and transformer depths, so the real model and the tiny
test model (tiny.py) load through the same code; heads are 64 channels wide (at least one).
"""
from __future__ import annotations

import re

from library.models import arch as base_arch

KIND = "sdxl"  # the configs/ folder
UNET_PREFIX = base_arch.UNET_PREFIX
VAE_PREFIX = base_arch.VAE_PREFIX
TE1_PREFIX = "conditioner.embedders.0.transformer."  # followed by "text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
REFINER_TE_PREFIX = "conditioner.embedders.0.model."
# kohya's (and SDXL's) VAE scaling factor; the architecture is SD1's, so the weights cannot tell.
VAE_SCALE_FACTOR = 0.13025

# What a file or folder is, as `detect` reports it.
SDXL_BASE, SDXL_REFINER, SD1, SD2, LORA, UNKNOWN = ("sdxl_base", "sdxl_refiner", "sd1", "sd2", "lora",
                                                    "unknown")


def shipped_config(component: str) -> dict:
    """A fresh copy of a shipped SDXL base config: unet, vae, text_encoder, text_encoder_2,
    scheduler or model_index."""
    return base_arch.shipped_config(component, KIND)


def detect(keys) -> str:
    """The model family of a single file's keys (see the constants above)."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return LORA
    if any(k.startswith(REFINER_TE_PREFIX) for k in keys):
        return SDXL_REFINER
    if any(k.startswith(TE2_PREFIX) for k in keys) or any(k.startswith("conditioner.embedders.") for k in keys):
        return SDXL_BASE
    if any(k.startswith(base_arch.OPEN_CLIP_PREFIX) for k in keys):
        return SD2
    if any(k.startswith(base_arch.TEXT_ENCODER_PREFIX) for k in keys):
        return SD1
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        return SDXL_BASE  # a UNet-only SDXL file; its missing encoders are reported when loading
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return SD1 if not any(".proj_in." in k for k in keys) else UNKNOWN
    return UNKNOWN


def detect_folder(model_index: dict, unet_config: dict, has_text_encoder: bool) -> str:
    """The family of a diffusers folder from its model_index.json, unet/config.json and whether it
    has a text_encoder/ (CLIP ViT-L, which the refiner lacks; its pipeline lists it as null)."""
    sdxl = (model_index.get("_class_name", "").startswith("StableDiffusionXL") or "text_encoder_2" in model_index
            or unet_config.get("addition_embed_type") == "text_time")
    if sdxl:
        listed = (model_index.get("text_encoder") or [None])[0] is not None if model_index else True
        return SDXL_BASE if has_text_encoder and listed else SDXL_REFINER
    return SD2 if unet_config.get("use_linear_projection") else SD1


def _transformer_depth(keys, block: str) -> int:
    rx = re.compile(re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 1


def infer_unet_config(sd: dict, pooled_dim: int, prefix: str = UNET_PREFIX) -> dict:
    """UNet2DConditionModel config from SDXL UNet keys after `prefix`.

    `pooled_dim` is bigG's projection width (1280): the size embedding takes the pooled text and
    6 size/crop numbers of `addition_time_embed_dim` channels each. Raises KeyError when an
    expected key is missing; callers turn that into a UserError.
    """
    common = base_arch.infer_unet_config(sd, prefix)  # levels, widths, block types, context width
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    levels, layers = len(common["block_out_channels"]), common["layers_per_block"]
    depths = [_transformer_depth(keys, f"input_blocks.{level * (layers + 1) + 1}") for level in range(levels)]
    adm_in = int(sd[f"{prefix}label_emb.0.0.weight"].shape[1])
    if (adm_in - pooled_dim) % 6 or adm_in <= pooled_dim:
        raise KeyError(f"label_emb.0.0.weight of width {adm_in} (pooled text {pooled_dim} + 6 size ids)")
    cfg = shipped_config("unet")
    for field in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                  "up_block_types", "cross_attention_dim", "use_linear_projection", "attention_head_dim"):
        cfg[field] = common[field]
    cfg.update(transformer_layers_per_block=depths, projection_class_embeddings_input_dim=adm_in,
               addition_time_embed_dim=(adm_in - pooled_dim) // 6)
    return cfg


def infer_vae_config(sd: dict, prefix: str = "") -> dict:
    """AutoencoderKL config from LDM VAE keys, with SDXL's scaling factor and fp32 upcast flag."""
    cfg = base_arch.infer_vae_config(sd, prefix)
    sdxl = shipped_config("vae")
    for field in ("scaling_factor", "force_upcast", "sample_size"):
        cfg[field] = sdxl[field]
    return cfg


def infer_text_encoder_config(te_sd: dict) -> dict:
    """CLIPTextConfig dict for CLIP ViT-L (text encoder 1) from transformers-named keys."""
    return base_arch.infer_text_encoder_config(te_sd, kind="sd15")


def infer_text_encoder_2_config(te_sd: dict) -> dict:
    """CLIPTextConfig dict for bigG (CLIPTextModelWithProjection) from transformers-named keys."""
    cfg = base_arch.infer_text_encoder_config(te_sd, kind="sd2")  # gelu, "!" (0) pads, as bigG
    cfg.update(architectures=["CLIPTextModelWithProjection"],
               projection_dim=int(te_sd["text_projection.weight"].shape[0]))
    return cfg

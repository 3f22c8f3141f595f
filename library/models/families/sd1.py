"""Stable Diffusion 1.x (SD1.5 and fine-tunes): one CLIP ViT-L text encoder, 1x1-conv attention
projections in the UNet, 512 px, epsilon prediction."""
from __future__ import annotations

import json
from pathlib import Path

from library.models.families import register
from library.models.families.base import ModelFamily

UNET_PREFIX = "model.diffusion_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's text encoder
SDXL_PREFIX = "conditioner.embedders."


def unet_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader reports a missing or broken config


class SD1(ModelFamily):
    name, title, v2, config_kind = "sd1", "SD1.x", False, "sd15"

    def matches_state_dict(self, state_dict) -> bool:
        # a UNet in the original layout, without SD2's OpenCLIP or SDXL's two encoders; an incomplete
        # text encoder is the loader's error to report, with the file's name
        keys = list(state_dict)
        return (any(k.startswith(UNET_PREFIX) for k in keys)
                and not any(k.startswith((OPEN_CLIP_PREFIX, SDXL_PREFIX)) for k in keys))

    def matches_folder(self, folder: Path) -> bool:
        config = unet_config(folder) or {}
        return not config.get("use_linear_projection") and not config.get("addition_embed_type")

    def base_model_version(self, v_parameterization: bool) -> str:
        return "sd_v1" + ("_v" if v_parameterization else "")

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        return "stable-diffusion-v1"


FAMILY = register(SD1())

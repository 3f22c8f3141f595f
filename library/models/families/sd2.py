"""Stable Diffusion 2.x (SD2.0/2.1, 512 epsilon and 768-v): one OpenCLIP ViT-H text encoder (its
penultimate layer), Linear attention projections in the UNet. v-prediction is not in the weights:
--v_parameterization (or a diffusers folder's scheduler config) says so."""
from __future__ import annotations

from pathlib import Path

from library.models.families import register
from library.models.families.base import ModelFamily
from library.models.families.sd1 import OPEN_CLIP_PREFIX, SDXL_PREFIX, UNET_PREFIX, unet_config


class SD2(ModelFamily):
    name, title, v2, config_kind = "sd2", "SD2.x", True, "sd2"

    def default_resolution(self, v_parameterization: bool = False) -> int:
        return 768 if v_parameterization else 512

    def matches_state_dict(self, state_dict) -> bool:
        keys = list(state_dict)
        return (any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
                and not any(k.startswith(SDXL_PREFIX) for k in keys))

    def matches_folder(self, folder: Path) -> bool:
        config = unet_config(folder) or {}
        return bool(config.get("use_linear_projection")) and not config.get("addition_embed_type")

    def base_model_version(self, v_parameterization: bool) -> str:
        return "sd_v2" + ("_v" if v_parameterization else "")

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        # kohya splits SD2 into 512 (epsilon) and 768-v
        return "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"


FAMILY = register(SD2())

"""The LoRA file metadata values that differ for SDXL, as kohya's sdxl_train_network.py writes them.

They replace the SD1/SD2 values of library/training/metadata.py's `training_metadata` (the rest of
the keys are the same for every family). kohya writes `sdxl_base_v1-0` for every SDXL model,
v-prediction fine-tunes included (those say so in `ss_v_parameterization` and
`modelspec.prediction_type`), and names Stability AI's repository as the implementation of an
SDXL LoRA (its keys use the original layout), not "diffusers".
"""
from __future__ import annotations

BASE_MODEL_VERSION = "sdxl_base_v1-0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DEFAULT_RESOLUTION = (1024, 1024)


def lora_metadata_values(v_parameterization: bool = False, resolution=None) -> dict[str, str]:
    """The SDXL values of the family-dependent metadata keys of a LoRA file."""
    width, height = resolution or DEFAULT_RESOLUTION
    return {
        "ss_v2": "False",
        "ss_base_model_version": BASE_MODEL_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE + "/lora",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }

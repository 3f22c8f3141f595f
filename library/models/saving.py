"""Save a model as a single-file checkpoint (original SD layout) or as a diffusers folder.

Both writes are atomic: an interrupted save leaves the previous file or folder untouched.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import atomic_dir, save_safetensors_atomic, torch_save_atomic, write_json_atomic
from library.models import arch, convert


def is_v2_text_encoder(text_encoder) -> bool:
    """SD2.x's OpenCLIP-H text encoder uses gelu; SD1.x's CLIP ViT-L quick_gelu (same class otherwise)."""
    return getattr(text_encoder.config, "hidden_act", None) == "gelu"


def checkpoint_state_dict(unet, text_encoder, vae, dtype: torch.dtype | None = None, v2: bool | None = None) -> dict:
    """All weights in the original SD layout, on the CPU, floats cast to `dtype` if given.

    `v2` (default: told by the text encoder) writes the text encoder as SD2.x's OpenCLIP.
    """
    v2 = is_v2_text_encoder(text_encoder) if v2 is None else v2
    return for_file(convert.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), v2=v2),
                    dtype)


def for_file(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """Detached CPU tensors, floats cast to `dtype` if given: what a checkpoint file holds."""
    out = {}
    for key, value in sd.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.cpu()
    return out


def write_checkpoint(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    """A single-file checkpoint by its suffix: .safetensors (with metadata) or .ckpt/.pt."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        # safetensors metadata is str -> str only
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        save_safetensors_atomic(sd, path, metadata=meta)
    elif suffix in (".ckpt", ".pt"):
        torch_save_atomic({"state_dict": sd}, path)  # metadata has no place in this format
    else:
        raise UserError(f"cannot save a checkpoint as '{path.name}': unknown file type.", path=path,
                        fix="end the file name with .safetensors (recommended) or .ckpt.")
    return path


def save_sd_checkpoint(path, unet, text_encoder, vae, dtype: torch.dtype | None = None,
                       metadata: dict | None = None, v2: bool | None = None) -> Path:
    """Write a single-file checkpoint that WebUI/ComfyUI load (.safetensors, or .ckpt); SD1.x or SD2.x."""
    return write_checkpoint(Path(path), checkpoint_state_dict(unet, text_encoder, vae, dtype, v2), metadata)


def save_diffusers(model, out_dir) -> Path:
    """Write a complete diffusers folder for `model` (an SDModel)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_text_encoder(model.text_encoder, tmp / "text_encoder")
        _save_tokenizer(tmp / "tokenizer", "sd2" if getattr(model, "v2", False) else "sd1")
        model.noise_scheduler.save_pretrained(tmp / "scheduler")
        index = arch.shipped_config("model_index")
        index["scheduler"] = ["diffusers", type(model.noise_scheduler).__name__]
        write_json_atomic(tmp / "model_index.json", index)
    return out_dir


def save_text_encoder(text_encoder, folder: Path) -> None:
    # Keys keep the `text_model.` level of real SD/SDXL folders: transformers 5 loads either form, and
    # older transformers and other tools need this one. SDXL's `text_projection` sits beside it.
    config = copy.deepcopy(text_encoder.config)
    config.architectures = [type(text_encoder).__name__]
    config.save_pretrained(folder)
    weights = {k if k.startswith("text_projection.") else "text_model." + k.removeprefix("text_model."):
               v.detach().cpu() for k, v in text_encoder.state_dict().items()}
    save_safetensors_atomic(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _save_tokenizer(folder: Path, kind: str = "sd1") -> None:
    # Every SD1.x model uses the same CLIP tokenizer (SD2.x the same vocabulary, padding with "!"),
    # so the shipped files are always right.
    from library.models.tokenizer import copy_tokenizer_files

    copy_tokenizer_files(kind, folder)

"""Save an SDXL model as a single file (original layout, what WebUI/ComfyUI load) or a diffusers folder.

Both writes are atomic: an interrupted save leaves the previous file or folder untouched.
"""
from __future__ import annotations

from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import atomic_dir, save_safetensors_atomic, torch_save_atomic, write_json_atomic
from library.models.saving import save_text_encoder
from library.models.sdxl import arch, convert


def checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None) -> dict:
    """All weights in SDXL's original layout, on the CPU, floats cast to `dtype` if given."""
    sd = convert.to_original(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
                             text_encoder_2.state_dict())
    out = {}
    for key, value in sd.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.cpu()
    return out


def save_sdxl_checkpoint(path, unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None,
                         metadata: dict | None = None) -> Path:
    """Write a single-file SDXL checkpoint (.safetensors, or .ckpt)."""
    path = Path(path)
    sd = checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2, dtype)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        save_safetensors_atomic(sd, path, metadata=meta)
    elif suffix in (".ckpt", ".pt"):
        torch_save_atomic({"state_dict": sd}, path)
    else:
        raise UserError(f"cannot save a checkpoint as '{path.name}': unknown file type.", path=path,
                        fix="end the file name with .safetensors (recommended) or .ckpt.")
    return path


def save_sdxl_diffusers(out_dir, unet, vae, text_encoder, text_encoder_2, noise_scheduler) -> Path:
    """Write a complete diffusers SDXL folder (StableDiffusionXLPipeline loads it)."""
    from library.models.tokenizer import copy_tokenizer_files

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        for model, name in ((text_encoder, "text_encoder"), (text_encoder_2, "text_encoder_2")):
            save_text_encoder(model, tmp / name)
        copy_tokenizer_files("sd1", tmp / "tokenizer")  # CLIP ViT-L: pads with <|endoftext|>
        copy_tokenizer_files("sd2", tmp / "tokenizer_2")  # bigG: pads with "!" (id 0), as open_clip
        noise_scheduler.save_pretrained(tmp / "scheduler")
        index = arch.shipped_config("model_index")
        index["scheduler"] = ["diffusers", type(noise_scheduler).__name__]
        write_json_atomic(tmp / "model_index.json", index)
    return out_dir


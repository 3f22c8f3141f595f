"""Save an SDXL model as a single file (original layout, what WebUI/ComfyUI load) or a diffusers folder.

Both writes are atomic: an interrupted save leaves the previous file or folder untouched.
"""
from __future__ import annotations

from pathlib import Path

import torch

from library.fileio import atomic_dir, write_json_atomic
from library.models.saving import for_file, save_text_encoder, write_checkpoint
from library.models.sdxl import arch, convert


def checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None) -> dict:
    """All weights in SDXL's original layout, on the CPU, floats cast to `dtype` if given."""
    return for_file(convert.to_original(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
                                        text_encoder_2.state_dict()), dtype)


def save_sdxl_checkpoint(path, unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None,
                         metadata: dict | None = None) -> Path:
    """Write a single-file SDXL checkpoint (.safetensors, or .ckpt)."""
    sd = checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2, dtype)
    return write_checkpoint(Path(path), sd, metadata)


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


"""The UNet LoRA of stage 2 as files: kohya format (WebUI, ComfyUI, kohya) and a diffusers/PEFT copy.

The PEFT copy is `lora/pytorch_lora_weights.safetensors` with diffusers' key names
(`unet.<module path>.lora_A.weight` / `.lora_B.weight`), what `pipe.load_lora_weights("lora/")`
reads. PEFT files carry no alpha (diffusers then uses alpha = rank, a scale of 1), so the kohya
scale alpha/rank is folded into lora_B: both files apply exactly the same change.
"""
from __future__ import annotations

from pathlib import Path

from library.fileio import save_safetensors_atomic

PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def peft_state_dict(network, unet, dtype=None) -> dict:
    from networks import lora_format as fmt

    by_name = {lora.lora_name: lora for lora in network.unet_loras}
    out = {}
    for path, _module in unet.named_modules():
        lora = by_name.get(fmt.lora_name(fmt.UNET_PREFIX, path))
        if lora is None:
            continue
        down = lora.lora_down.weight.detach().float().cpu()
        up = lora.lora_up.weight.detach().float().cpu() * lora.scale
        out[f"unet.{path}.lora_A.weight"] = down.to(dtype or down.dtype)
        out[f"unet.{path}.lora_B.weight"] = up.to(dtype or up.dtype)
    return out


def save_peft_copy(network, unet, folder, dtype=None) -> Path:
    path = Path(folder) / PEFT_WEIGHT_NAME
    save_safetensors_atomic(peft_state_dict(network, unet, dtype), path, metadata={"format": "pt"})
    return path


def find_lora_file(path) -> Path:
    """A LoRA to load at inference: a file, or a folder's PEFT copy, or its only .safetensors."""
    from library.errors import UserError

    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / PEFT_WEIGHT_NAME).is_file():
            return path / PEFT_WEIGHT_NAME
        for candidate in (path / "lora" / PEFT_WEIGHT_NAME, path / "final" / "lora" / PEFT_WEIGHT_NAME):
            if candidate.is_file():
                return candidate
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
    raise UserError("no LoRA found there.", path=path,
                    fix=f"pass the lora/ folder a training run wrote (it holds {PEFT_WEIGHT_NAME}), or a LoRA file.")

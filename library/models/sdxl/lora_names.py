"""kohya's SDXL LoRA module names, from our (diffusers) module paths.

kohya trains SDXL on its own copy of the original UNet (library/sdxl_original_unet.py), so its
SDXL LoRA files name UNet modules by the ORIGINAL layout, dots turned into underscores:

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q     (diffusers: down_blocks.1.attentions.0...)
    lora_unet_middle_block_1_proj_in                               (mid_block.attentions.0.proj_in)
    lora_unet_output_blocks_2_2_conv                               (up_blocks.0.upsamplers.0.conv, LoCon)
    lora_unet_input_blocks_1_0_in_layers_2                         (down_blocks.0.resnets.0.conv1, LoCon)

and the two text encoders `lora_te1_text_model_...` (CLIP ViT-L) and `lora_te2_text_model_...`
(bigG), with transformers' names. Which layers get a module is SD1.x's rule (kohya's, and
networks/lora_format.py's; the class lists below are kept equal to those by a test, as
library/models does not import networks/): Linear and 1x1-conv layers inside Transformer2DModel
(UNet) and CLIPAttention/CLIPMLP (text encoders); with conv_dim (LoCon) also the layers of
ResnetBlock2D, Downsample2D and Upsample2D. diffusers names these classes as kohya's UNet does.

The UNet's block numbering is SDXL base's (3 levels of 2 layers, attention in all but the
first level, which kohya's UNet hard-codes); the tiny model shares it. At SDXL's shapes a LoRA
has, per part: UNet 722 modules (788 with LoCon), te1 72, te2 192; each is 3 tensors in a file
(lora_down, lora_up, alpha).
"""
from __future__ import annotations

from functools import lru_cache

from library.models import convert as base_convert

UNET_PREFIX = "lora_unet"
TE1_PREFIX = "lora_te1"
TE2_PREFIX = "lora_te2"
TEXT_ENCODER_PREFIXES = (TE1_PREFIX, TE2_PREFIX)
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

# kohya's SDXL blocks for block_dims / block_alphas / down_lr_weight ...: 0 time and size
# embeddings, 1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out.
NUM_BLOCKS = 23


@lru_cache(maxsize=1)
def _sdxl_unet_keys() -> tuple[str, ...]:
    """Enough of SDXL base's diffusers key names to number its blocks the original way."""
    keys = [f"down_blocks.{i}.resnets.{j}.conv1.weight" for i in range(3) for j in range(2)]
    keys += [f"up_blocks.{i}.resnets.{j}.conv1.weight" for i in range(3) for j in range(3)]
    keys += [f"up_blocks.{i}.attentions.{j}.proj_in.weight" for i in (0, 1) for j in range(3)]
    return tuple(keys)


def original_unet_path(module_path: str) -> str:
    """A diffusers SDXL UNet module's path in the original layout (`input_blocks.4.1.proj_in`)."""
    return base_convert.unet_module_paths_to_ldm([module_path], _sdxl_unet_keys())[module_path]


def lora_module_name(prefix: str, module_path: str) -> str:
    """kohya's SDXL name for a module: `lora_unet` + its original-layout path, or `lora_te1`/`lora_te2`
    + its transformers path with transformers 4's `text_model.` level (which transformers 5's
    CLIPTextModel, not CLIPTextModelWithProjection, dropped); dots become underscores."""
    if prefix == UNET_PREFIX:
        module_path = original_unet_path(module_path)
    elif prefix in TEXT_ENCODER_PREFIXES:
        module_path = "text_model." + module_path.removeprefix("text_model.")
    else:
        raise ValueError(f"not an SDXL LoRA prefix: {prefix!r}")
    return f"{prefix}_{module_path}".replace(".", "_")


def block_index(lora_name: str) -> int | None:
    """kohya's SDXL block of a UNet module name (sdxl get_block_index); None for text encoders."""
    if not lora_name.startswith(UNET_PREFIX + "_"):
        return None
    name = lora_name[len(UNET_PREFIX) + 1:]
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return first + int(name[len(start):].split("_", 1)[0])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return NUM_BLOCKS - 1 if name.startswith("out_") else None


def part_of(lora_name: str) -> str | None:
    """"unet", "te1" or "te2" for a kohya SDXL module name (None for another model's name)."""
    for part, prefix in (("unet", UNET_PREFIX), ("te1", TE1_PREFIX), ("te2", TE2_PREFIX)):
        if lora_name.startswith(prefix + "_"):
            return part
    return None

"""kohya's SDXL LoRA module names, and the map between them and our (diffusers) modules.

kohya trains SDXL on its own copy of the original UNet (library/sdxl_original_unet.py), so its
SDXL LoRA files name UNet modules by the ORIGINAL layout, dots turned into underscores:

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q     (diffusers: down_blocks.1.attentions.0...)
    lora_unet_middle_block_1_proj_in                               (mid_block.attentions.0.proj_in)
    lora_unet_output_blocks_2_2_conv                               (up_blocks.0.upsamplers.0.conv, LoCon)
    lora_unet_input_blocks_1_0_in_layers_2                         (down_blocks.0.resnets.0.conv1, LoCon)

and the two text encoders `lora_te1_text_model_...` (CLIP ViT-L) and `lora_te2_text_model_...`
(bigG), with transformers' names. Which layers get a module is the rule of SD1.x LoRA (kohya's
and networks/lora_format.py's): Linear and 1x1-conv layers inside Transformer2DModel (UNet) and
CLIPAttention/CLIPMLP (text encoders); with conv_dim (LoCon) also the layers of ResnetBlock2D,
Downsample2D and Upsample2D. diffusers names these classes as kohya's UNet does.

At SDXL's shapes that is, per part: UNet 722 modules (788 with LoCon), te1 72, te2 192; each
module is 3 tensors in a file (lora_down, lora_up, alpha).
"""
from __future__ import annotations

from library.models import convert as base_convert
from networks import lora_format as fmt

UNET_PREFIX = "lora_unet"
TE1_PREFIX = "lora_te1"
TE2_PREFIX = "lora_te2"


def _flat(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def unet_lora_names(unet, conv: bool = False) -> dict[str, str]:
    """{diffusers module path: kohya SDXL LoRA name} for every layer a LoRA targets.

    `conv`: LoCon (conv_dim) also targets the ResNet, down- and upsampler layers.
    """
    classes = fmt.UNET_TARGETS + (fmt.UNET_CONV_TARGETS if conv else ())
    paths = [path for path, _ in fmt.iter_targets(unet, classes)]
    original = base_convert.unet_module_paths_to_ldm(paths, unet.state_dict().keys())
    return {path: _flat(UNET_PREFIX, original[path]) for path in paths}


def text_encoder_lora_names(text_encoder, index: int) -> dict[str, str]:
    """{module path: kohya name} for text encoder `index` (1: CLIP ViT-L, 2: bigG).

    kohya's names keep transformers 4's `text_model.` level, which transformers 5's CLIPTextModel
    (not CLIPTextModelWithProjection) no longer has.
    """
    prefix = {1: TE1_PREFIX, 2: TE2_PREFIX}[index]
    return {path: _flat(prefix, "text_model." + path.removeprefix("text_model."))
            for path, _ in fmt.iter_targets(text_encoder, fmt.TE_TARGETS)}


def sdxl_lora_names(unet, text_encoder_1, text_encoder_2, conv: bool = False) -> dict[str, dict[str, str]]:
    """Per part ("unet", "te1", "te2"): {module path: kohya name}."""
    return {"unet": unet_lora_names(unet, conv),
            "te1": text_encoder_lora_names(text_encoder_1, 1),
            "te2": text_encoder_lora_names(text_encoder_2, 2)}


# kohya's SDXL blocks for block_dims / block_alphas / down_lr_weight ...: 0 time and size
# embeddings, 1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out.
NUM_BLOCKS = 23


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

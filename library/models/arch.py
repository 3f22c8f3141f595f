"""Model architectures: the shipped SD1.5 / SD2.x configs, and configs inferred from checkpoint shapes.

A single-file checkpoint carries no config. Rather than assume SD1.5's sizes, the few numbers that
vary (channel widths, layer counts, context width) are read from tensor shapes and laid over the
shipped config of the family ("sd15" or "sd2"), so the real models and our tiny test models load
through the same code. Everything the shapes cannot tell (norm groups, sample size) keeps the
family's value; attention heads follow each family's rule (SD1.x: 8 heads; SD2.x and OpenCLIP:
heads 64 wide, at least one).

configs/sd2 is SD2-base (512, epsilon). SD2 768-v has the same architecture and differs only in
the scheduler's prediction_type (v_prediction), which --v_parameterization sets.
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."  # followed by "text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x text encoder


def config_dir(kind: str = "sd15") -> Path:
    return CONFIG_ROOT / kind


def family(v2: bool) -> str:
    """The configs/ folder of a model family."""
    return "sd2" if v2 else "sd15"


def heads_64_wide(width: int) -> int:
    """SD2.x's and OpenCLIP's attention heads are 64 channels wide (tiny models: at least one head)."""
    return max(1, width // 64)


@lru_cache(maxsize=None)
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_config(component: str, kind: str = "sd15") -> dict:
    """A fresh copy of a shipped config: unet, vae, text_encoder, scheduler or model_index."""
    if component == "model_index":
        path = config_dir(kind) / "model_index.json"
    else:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        path = config_dir(kind) / component / name
    return copy.deepcopy(_read_json(path))


def model_kwargs(config: dict) -> dict:
    """Drop the bookkeeping keys ("_class_name", ...) that model constructors do not take."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: dict, prefix: str = "") -> dict:
    """UNet2DConditionModel config from LDM UNet keys (`input_blocks.*`, ...) after `prefix`.

    Raises KeyError when an expected key is missing; callers turn that into a UserError.
    """
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    p = prefix
    inputs = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamples = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsamples) + 1
    # input_blocks: conv_in, then per level `layers` resnets and (except the last) one downsampler
    layers = len(inputs) // levels - 1
    if layers < 1 or levels * (layers + 1) != len(inputs):
        raise KeyError("input_blocks")
    channels, down_types = [], []
    for level in range(levels):
        first = level * (layers + 1) + 1
        channels.append(int(sd[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        has_attn = f"input_blocks.{first}.1.proj_in.weight" in keys
        down_types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
    up_types = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in down_types[::-1]]
    attn2 = f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    proj_in = sd[f"{p}middle_block.1.proj_in.weight"]
    linear = proj_in.ndim == 2  # SD2.x projects with Linear, SD1.x with 1x1 conv
    cfg = shipped_config("unet", family(linear))
    if linear:
        cfg["attention_head_dim"] = [heads_64_wide(c) for c in channels]  # diffusers' name for the head count
    cfg.update(
        in_channels=int(sd[f"{p}input_blocks.0.0.weight"].shape[1]),
        out_channels=int(sd[f"{p}out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down_types,
        up_block_types=up_types,
        cross_attention_dim=int(sd[attn2].shape[1]),
        use_linear_projection=linear,
    )
    return cfg


def infer_vae_config(sd: dict, prefix: str = "") -> dict:
    """AutoencoderKL config from LDM VAE keys (`encoder.down.*`, ...) after `prefix`."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    p = prefix
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    layers = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not layers:
        raise KeyError("encoder.down")
    channels = [int(sd[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    cfg = shipped_config("vae")
    cfg.update(
        in_channels=int(sd[f"{p}encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd[f"{p}decoder.conv_out.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=len(layers),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        latent_channels=int(sd[f"{p}post_quant_conv.weight"].shape[0]),
    )
    return cfg


def infer_text_encoder_config(sd: dict, prefix: str = "", kind: str = "sd15") -> dict:
    """CLIPTextConfig dict from CLIP keys (`embeddings.*`, `encoder.layers.*`) after `prefix`.

    `kind` "sd2" for SD2.x's OpenCLIP encoder (gelu instead of quick_gelu; same key names once
    converted, see convert.open_clip_to_diffusers).
    """
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    p = prefix
    tokens = sd[f"{p}embeddings.token_embedding.weight"]
    hidden = int(tokens.shape[1])
    cfg = shipped_config("text_encoder", kind)
    cfg.update(
        vocab_size=int(tokens.shape[0]),
        hidden_size=hidden,
        max_position_embeddings=int(sd[f"{p}embeddings.position_embedding.weight"].shape[0]),
        num_hidden_layers=len(_indices(keys, r"encoder\.layers\.(\d+)\.")),
        intermediate_size=int(sd[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_attention_heads=heads_64_wide(hidden),  # CLIP's heads are 64 wide
        projection_dim=hidden,
    )
    return cfg

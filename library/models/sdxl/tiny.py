"""A tiny model with SDXL base's exact module structure (so LoRA names are the real ones).

Widths are small and weights random (fixed seed); everything else is SDXL's: a UNet with 3
levels (no attention at the first; 1, 2 and 10 transformer blocks per attention as in SDXL:
[1, 2, 10]), Linear projections, the `text_time` size embedding; the SD VAE's 4 blocks; a
12-layer quick_gelu CLIP text encoder and a 32-layer gelu bigG with a text projection, both
with the full CLIP vocabulary. The UNet's context is the two encoders' widths side by side
(32 + 64 here, 768 + 1280 in SDXL), its pooled input bigG's projection plus 6 size ids.

`write_tiny_sdxl` writes it as a diffusers folder and as a single file in SDXL's original
layout (`python -m library.models.sdxl.tiny --output_dir DIR`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from library.models import tiny as sd_tiny

TE1_WIDTH, TE2_WIDTH, TIME_IDS_WIDTH = 32, 64, 8
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96),  # a channel change at each level, as SDXL's 320, 640, 1280
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(1, 1, 1),  # diffusers' name for the head count: heads 64 wide, at least one
    use_linear_projection=True,
    cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_IDS_WIDTH,
    projection_class_embeddings_input_dim=TE2_WIDTH + 6 * TIME_IDS_WIDTH,
    norm_num_groups=32,
)
TINY_VAE = dict(sd_tiny.TINY_VAE, scaling_factor=0.13025, force_upcast=True)
TINY_TEXT_ENCODER = dict(sd_tiny.TINY_TEXT_ENCODER, hidden_size=TE1_WIDTH)
TINY_TEXT_ENCODER_2 = dict(sd_tiny.TINY_TEXT_ENCODER, hidden_size=TE2_WIDTH, intermediate_size=4 * TE2_WIDTH,
                           num_hidden_layers=32, hidden_act="gelu", pad_token_id=0, projection_dim=TE2_WIDTH)


@dataclass
class TinySDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # CLIPTextModel (CLIP ViT-L's structure)
    text_encoder_2: torch.nn.Module  # CLIPTextModelWithProjection (bigG's structure)


def build_tiny_sdxl(seed: int = 0) -> TinySDXLComponents:
    """The four models with random weights from `seed`, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    te1 = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_ENCODER_2))
    return TinySDXLComponents(unet.eval(), vae.eval(), te1.eval(), te2.eval())


@dataclass
class TinySDXLPaths:
    diffusers_dir: Path  # out_dir/tiny-sdxl/
    single_file: Path  # out_dir/tiny-sdxl.safetensors (SDXL's original layout)


def write_tiny_sdxl(out_dir, seed: int = 0) -> TinySDXLPaths:
    """Write the tiny model as a diffusers folder and a single file; same seed, same bytes."""
    from library.models.loading import make_noise_scheduler
    from library.models.sdxl.saving import save_sdxl_checkpoint, save_sdxl_diffusers

    out_dir = Path(out_dir)
    parts = build_tiny_sdxl(seed)
    paths = TinySDXLPaths(out_dir / "tiny-sdxl", out_dir / "tiny-sdxl.safetensors")
    save_sdxl_diffusers(paths.diffusers_dir, parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2,
                        make_noise_scheduler())
    # No extra metadata: safetensors orders metadata keys at random, and these bytes must repeat.
    save_sdxl_checkpoint(paths.single_file, parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random SDXL-structured model for tests and dry runs "
                                                 "(a diffusers folder and a .safetensors file in SDXL's layout).")
    parser.add_argument("--output_dir", required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    paths = write_tiny_sdxl(args.output_dir, seed=args.seed)
    print(paths.diffusers_dir)
    print(paths.single_file)


if __name__ == "__main__":
    from library.errors import run_cli

    raise SystemExit(run_cli(main))

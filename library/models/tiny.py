"""Tiny models with SD1.5's (or SD2.x's) exact module structure (so LoRA names are the real ones).

Widths are small and weights random (fixed seed); block types, layer counts and module names
match SD1.5: a UNet with 4 down / 4 up blocks, 2 layers per block, one transformer per attention
block; a VAE with 4 blocks; a 12-layer CLIP text encoder with the full CLIP vocabulary.

`v2=True` gives SD2.x's structure: Linear proj_in/proj_out, one head per 64 channels (so at least
one here), and a 23-layer gelu text encoder (SD2's OpenCLIP-H as diffusers holds it: the 24th
layer is unused), written to the single file as OpenCLIP under `cond_stage_model.model.`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 96, 96),  # a channel change at each of the first 3 blocks, as SD1.5
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
)
# SD2.x: the same blocks; Linear projections and heads 64 channels wide (here: 1 per block).
TINY_UNET_V2 = dict(TINY_UNET, attention_head_dim=(1, 1, 1, 1), use_linear_projection=True)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=12,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# SD2.x's OpenCLIP-H as diffusers holds it: 23 layers (of 24), gelu, "!" (id 0) pads.
TINY_TEXT_ENCODER_V2 = dict(TINY_TEXT_ENCODER, num_hidden_layers=23, hidden_act="gelu", pad_token_id=0)


def build_tiny_components(seed: int = 0, v2: bool = False):
    """Return (unet, vae, text_encoder) with random weights from `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET_V2 if v2 else TINY_UNET))
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT_ENCODER_V2 if v2 else TINY_TEXT_ENCODER)))
    return unet.eval(), vae.eval(), text_encoder.eval()


@dataclass
class TinyModelPaths:
    diffusers_dir: Path  # out_dir/tiny-sd15/ (tiny-sd2/ with v2)
    single_file: Path  # out_dir/tiny-sd15.safetensors (original SD layout)


def write_tiny_model(out_dir, seed: int = 0, v2: bool = False) -> TinyModelPaths:
    """Write the tiny model as a diffusers folder and as a single file; same seed, same bytes."""
    from library.models.loading import SDModel, make_noise_scheduler
    from library.models.saving import save_diffusers, save_sd_checkpoint

    out_dir = Path(out_dir)
    unet, vae, text_encoder = build_tiny_components(seed, v2=v2)
    name = "tiny-sd2" if v2 else "tiny-sd15"
    paths = TinyModelPaths(diffusers_dir=out_dir / name, single_file=out_dir / f"{name}.safetensors")
    model = SDModel(tokenizer=None, text_encoder=text_encoder, vae=vae, unet=unet,
                    noise_scheduler=make_noise_scheduler(), v2=v2, model_path=str(paths.diffusers_dir),
                    model_name=name)
    save_diffusers(model, paths.diffusers_dir)
    # No extra metadata: safetensors orders metadata keys at random, and these bytes must repeat.
    save_sd_checkpoint(paths.single_file, unet, text_encoder, vae)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random SD1.5- (or SD2-) structured model for tests "
                                                 "and dry runs (a diffusers folder and a .safetensors file).")
    parser.add_argument("--output_dir", required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--v2", action="store_true", help="SD2.x structure (OpenCLIP text encoder) instead of SD1.5")
    args = parser.parse_args(argv)
    paths = write_tiny_model(args.output_dir, seed=args.seed, v2=args.v2)
    print(paths.diffusers_dir)
    print(paths.single_file)


if __name__ == "__main__":
    from library.errors import run_cli

    raise SystemExit(run_cli(main))

#!/usr/bin/env python
"""Train a LoRA / LoCon network on Stable Diffusion 1.x: command-line compatible with kohya sd-scripts.

    python train_network.py --pretrained_model_name_or_path model.safetensors --train_data_dir data \
        --output_dir out --network_module networks.lora --network_dim 32 --learning_rate 1e-4
    accelerate launch train_network.py ...   # the same, through accelerate

Every option can also come from a TOML file: --config_file settings.toml.
"""
from __future__ import annotations

import argparse
import sys

from library import args as A
from library.errors import run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a LoRA network on Stable Diffusion (kohya-compatible).")
    A.add_config_arguments(parser)
    A.add_model_arguments(parser)
    A.add_dataset_arguments(parser, lora_trainer=True)
    A.add_masked_loss_arguments(parser)
    A.add_training_arguments(parser)
    A.add_optimizer_arguments(parser)
    A.add_sampling_arguments(parser)
    A.add_validation_arguments(parser)
    A.add_trainer_automation_arguments(parser)
    A.add_metadata_arguments(parser)

    g = parser.add_argument_group("network")
    g.add_argument("--network_module", type=str, default="networks.lora", help="network module to train")
    g.add_argument("--network_dim", type=A.positive_int, default=4, help="rank of the LoRA modules")
    g.add_argument("--network_alpha", type=A.non_negative_float, default=1.0,
                   help="alpha: the LoRA output is scaled by alpha / rank (kohya's default 1; 0 means alpha = rank)")
    g.add_argument("--network_dropout", type=A.unit_float, default=None, help="dropout on the LoRA hidden units")
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help='extra network options, e.g. "conv_dim=4" "conv_alpha=1" (LoCon), "rank_dropout=0.1", '
                        '"module_dropout=0.1", "block_dims=<25 ranks>", "down_lr_weight=sine" (see README)')
    g.add_argument("--network_weights", type=str, default=None, help="start from these LoRA weights")
    g.add_argument("--dim_from_weights", action="store_true", help="take ranks from --network_weights")
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="LoRA files merged into the base model before training (the new network learns on top)")
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="one multiplier per --base_weights file (default 1)")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train only the text-encoder part")
    g.add_argument("--unet_lr", type=A.non_negative_float, default=None, help="learning rate of the U-Net part")
    g.add_argument("--text_encoder_lr", type=A.non_negative_float, default=None, nargs="*",
                   help="learning rate of the text-encoder part: one value per text encoder, as kohya (SD1/SD2 "
                        "have one, so the first is used)")
    g.add_argument("--network_multiplier", type=float, default=1.0, help="multiplier of the network output")
    g.add_argument("--scale_weight_norms", type=A.positive_float, default=None,
                   help="scale down modules whose weight norm exceeds this (1 is a good start)")
    g.add_argument("--no_metadata", action="store_true", help="save no training metadata in the file")
    g.add_argument("--fp8_base", action="store_true",
                   help="keep the frozen U-Net's weights in fp8 (float8_e4m3fn), cast to the --mixed_precision "
                        "dtype layer by layer as they are used: half the U-Net's weight memory of bf16, coarser base "
                        "weights, and slower steps (a memory saving, for small GPUs); normalization layers stay "
                        "as they are; needs --mixed_precision fp16/bf16")
    return parser


def main(argv=None):
    parser = setup_parser()
    args = A.parse_args(parser, argv)
    from library.training.network_trainer import train

    return train(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Paired two-modality generation: two UNets over one frozen base, one LoRA each, trained together.

    python train_dual_unet.py --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors \
        --data_dir retina --output_dir results --name 260224_dual_unet_v27 --max_steps 15000 \
        --unet_lora_rank 16 --unet_lora_alpha 16 --hf_lambda 0.5 --struct_lambda 0.3 --offset_noise_strength 0.1

`retina/cf/0001.png` and `retina/fa/0001.png` are one registered pair (--modalities names the
folders). Each modality gets its own noise and timestep; the structure loss ties the two UNets'
predicted x0 latents together. Then `gen_pairs.py --checkpoint_dir results/<name>/best_checkpoint`
generates pairs from shared initial noise. Every option can also come from --config_file (TOML).
"""
from __future__ import annotations

import argparse
import sys

from library import args as A
from library.errors import run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train two UNet LoRAs that generate registered image pairs "
                                                 "of two modalities (e.g. colour fundus + angiography).")
    A.add_config_arguments(parser)
    A.add_model_arguments(parser)
    A.add_training_arguments(parser, max_steps_alias=False)  # its own --max_steps below
    A.add_optimizer_arguments(parser)
    parser.set_defaults(learning_rate=1e-4)  # a LoRA rate (kohya's 2e-6 default is for full fine-tuning)

    d = parser.add_argument_group("paired data")
    d.add_argument("--data_dir", type=str, default=None,
                   help="folder with one subfolder per modality (e.g. cf/ and fa/); pairs share a file name")
    d.add_argument("--pairs_file", type=str, default=None,
                   help="instead of --data_dir: a .csv (header id,cf,fa,split) or .jsonl listing of pairs; "
                        "paths relative to the file")
    d.add_argument("--modalities", type=str, nargs=2, default=["cf", "fa"], metavar=("A", "B"),
                   help="names of the two modalities: data folders / listing columns and LoRA file names")
    d.add_argument("--resolution", type=A.positive_int, default=512,
                   help="square training size in pixels (multiple of 8); images are resized and centre-cropped")
    d.add_argument("--validation_split", "--val_split", type=A.unit_float, default=0.1,
                   help="share of the pairs held out for the validation loss (unless the listing has a split column), "
                        "the same pairs in every run (Lightning's --val_split works too)")
    d.add_argument("--max_validation_pairs", type=A.positive_int, default=100,
                   help="at most this many validation pairs from --validation_split")
    d.add_argument("--cache_latents", action="store_true", help="encode every image once with the VAE before training")
    d.add_argument("--cache_latents_to_disk", action="store_true",
                   help="like --cache_latents, and keep the latents beside the images for later runs")
    d.add_argument("--vae_batch_size", type=A.positive_int, default=1, help="batch size for latent caching")
    d.add_argument("--max_data_loader_n_workers", type=A.non_negative_int, default=8,
                   help="DataLoader worker processes (none are used with cached latents)")
    d.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep DataLoader workers alive between epochs")

    g = parser.add_argument_group("dual unet")
    g.add_argument("--name", type=str, default=None, help="run folder inside --output_dir (the seed's run name)")
    g.add_argument("--max_steps", type=A.positive_int, default=None, help="same as --max_train_steps")
    g.add_argument("--unet_lora_rank", type=A.positive_int, default=16, help="rank of each modality's LoRA")
    g.add_argument("--unet_lora_alpha", type=A.positive_float, default=None,
                   help="LoRA alpha (output scaled by alpha/rank); default: the rank")
    g.add_argument("--network_dropout", type=A.unit_float, default=None, help="dropout on the LoRA hidden units")
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help='extra networks.lora options for both LoRAs, e.g. "conv_dim=8" "conv_alpha=8" (LoCon)')
    g.add_argument("--prompts", type=str, nargs=2, default=None, metavar=("PROMPT_A", "PROMPT_B"),
                   help="a fixed prompt per modality (default: unconditional, the empty prompt)")
    g.add_argument("--hf_lambda", type=A.non_negative_float, default=0.5,
                   help="weight of the high-frequency L1 loss on predicted x0 (fine texture)")
    g.add_argument("--struct_lambda", type=A.non_negative_float, default=0.3,
                   help="weight of the structure loss between the two modalities' predicted x0 (Sobel edges)")
    g.add_argument("--struct_loss", type=str, default="l1", choices=["l1", "ncc"],
                   help="l1: L1 between Sobel edge magnitudes (the seed's); ncc: 1 - correlation of them "
                        "(blind to edge strength)")
    g.add_argument("--offset_noise_strength", type=A.non_negative_float, default=None,
                   help="offset noise (same as --noise_offset; 0.1 in the seed's recipe)")
    g.add_argument("--validate_every", type=A.non_negative_int, default=500,
                   help="validation loss every N steps (and at the end); the best one is kept in best_checkpoint/")
    g.add_argument("--keep_last", type=A.positive_int, default=3,
                   help="rolling checkpoints kept in latest_checkpoints/ (every --save_every_n_steps, default "
                        "--validate_every)")

    s = parser.add_argument_group("sample pairs")
    s.add_argument("--sample_every", "--log_images_every_n_steps", type=A.non_negative_int, default=500,
                   help="write step_XXXXXX_random_pairs/ and log their grid to TensorBoard (samples/pairs) every N "
                        "steps (0: never; Lightning's --log_images_every_n_steps works too)")
    s.add_argument("--num_sample_pairs", type=A.non_negative_int, default=10, help="pairs per sample folder")
    s.add_argument("--sample_steps", type=A.positive_int, default=30, help="denoising steps of sample pairs")
    s.add_argument("--sample_sampler", type=str, default="ddim", choices=["ddim", "euler", "euler_a", "dpmsolver++",
                                                                          "pndm", "lms", "heun", "ddpm"],
                   help="sampler for the sample pairs")
    s.add_argument("--sample_at_first", action="store_true", help="also write sample pairs before training")
    A.add_trainer_automation_arguments(
        parser, top_k_files="top_k_checkpoints/step_*/ in the run folder, listed in dual_unet-top_k.json",
        monitor_names="any logged name, e.g. val/loss (the default with validation pairs and --validate_every), "
                      "val/struct, loss/epoch (the default without), loss/average")
    return parser


def main(argv=None):
    parser = setup_parser()
    args = A.parse_args(parser, argv)
    if args.save_every_n_steps is None:
        args.save_every_n_steps = args.validate_every or None
    from library.dual_unet.trainer import train

    return train(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The command line of train_controlnet.py (its parser and main), here so that library code such as
the two-stage pipeline (pipeline.py) can run a stage without importing the script.
"""
from __future__ import annotations

import argparse
import sys

from library import args as A

RADAR_AXES_HELP = ("radar axes: column x = (v + vel_max) / (2 vel_max) * (W - 1), row y = (1 - r / range_max) * (H - 1) "
                   "(range 0 at the bottom)")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a ControlNet (and a UNet LoRA on it) for Stable Diffusion 1.x.")
    A.add_config_arguments(parser)
    A.add_model_arguments(parser)
    # no --reg_data_dir / --dataset_config: see REFUSED
    A.add_dataset_arguments(parser, reg_and_config=False)
    A.add_training_arguments(parser)
    A.add_optimizer_arguments(parser)
    A.add_trainer_automation_arguments(parser)

    c = parser.add_argument_group("controlnet")
    c.add_argument("--conditioning_type", type=str, default="auto", choices=["auto", "image", "radar_heatmap", "inpaint"],
                   help="what conditions the ControlNet: conditioning images, radar targets drawn as heatmaps, or "
                        "the image with a hole at -1 for inpainting (auto: inpaint with --ann_file, radar when the "
                        "listing has 'targets', else image)")
    c.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of conditioning images with the same base names as the training images")
    c.add_argument("--train_listing", type=str, default=None,
                   help="metadata.jsonl (one {file_name, text, conditioning_file_name | targets, split} per line) "
                        "or a .toml with [[items]]; paths relative to its folder")
    c.add_argument("--image_dir", type=str, default=None,
                   help="inpainting: folder of the images that --ann_file annotates (COCO's train2017/)")
    c.add_argument("--ann_file", type=str, default=None,
                   help="inpainting: COCO instances JSON (polygons or RLE); each sample masks one random instance")
    c.add_argument("--mask_dilation", type=A.non_negative_int, default=4,
                   help="inpainting: grow every hole by this many pixels of the training image (inference uses the "
                        "same by default)")
    c.add_argument("--min_mask_area", type=A.non_negative_float, default=256.0,
                   help="inpainting: leave out instances smaller than this many pixels of the original image "
                        "(COCO's 'area')")
    c.add_argument("--random_mask_prob", type=A.unit_float, default=0.25,
                   help="inpainting: share of samples whose hole is a random box or brush strokes instead of an "
                        "instance (images without instances always get one)")
    c.add_argument("--inpaint_caption", type=str, default="instance", choices=["instance", "image", "none"],
                   help="inpainting captions: 'a <category>' of the masked instance (random masks: every category "
                        "of the image), always the image's categories, or none")
    c.add_argument("--validation_split", "--val_split", type=A.unit_float, default=0.0,
                   help="share of the images kept for the validation loss (listing entries with "
                        "\"split\": \"val\" are used instead when present)")
    c.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="continue training this ControlNet (folder or .safetensors) instead of copying the base UNet")
    c.add_argument("--range_max", type=A.positive_float, default=200.0, help="largest range; " + RADAR_AXES_HELP)
    c.add_argument("--vel_max", type=A.positive_float, default=40.0, help="largest |velocity|; " + RADAR_AXES_HELP)
    c.add_argument("--heatmap_sigma", type=A.positive_float, default=8.0,
                   help="Gaussian width of each target in pixels of the training image (use the same at inference)")
    c.add_argument("--loss_weight_factor", type=A.non_negative_float, default=0.0,
                   help="loss weight 1 + factor x heatmap (at latent size), normalised: 0 is the plain loss")
    c.add_argument("--use_focal_loss", action="store_true",
                   help="also weigh each latent pixel by |error|^focal_gamma (a focal re-weighting of the MSE)")
    c.add_argument("--focal_gamma", type=A.non_negative_float, default=2.0, help="exponent of --use_focal_loss")

    g = parser.add_argument_group("sampling")
    g.add_argument("--log_images_every_n_steps", type=A.positive_int, default=None,
                   help="every N steps, generate up to 4 fixed validation (else training) examples with the "
                        "ControlNet being trained and log them as one grid to TensorBoard (controlnet/images) "
                        "and <output_dir>/sample; rows: condition | target | result (inpaint: image | mask | "
                        "masked condition | result)")

    s = parser.add_argument_group("stages")
    s.add_argument("--train_unet_lora", action="store_true",
                   help="stage 2: train only a UNet LoRA; the ControlNet (--controlnet_path), UNet, VAE and "
                        "text encoder stay frozen")
    s.add_argument("--controlnet_path", type=str, default=None, help="the trained ControlNet for --train_unet_lora")
    s.add_argument("--lora_rank", type=A.positive_int, default=16, help="rank of the UNet LoRA")
    s.add_argument("--lora_alpha", type=A.positive_float, default=None,
                   help="LoRA alpha (default: the rank, i.e. scale 1 as in PEFT-based scripts)")
    s.add_argument("--lora_learning_rate", type=A.positive_float, default=None,
                   help="learning rate of the LoRA (default --learning_rate)")
    s.add_argument("--joint", action="store_true",
                   help="two stages: ControlNet only, then ControlNet + UNet LoRA (outputs in final/)")
    s.add_argument("--stage2_max_train_steps", type=A.positive_int, default=None, help="joint: steps of stage 2")
    s.add_argument("--stage2_max_train_epochs", type=A.positive_int, default=None, help="joint: epochs of stage 2")
    s.add_argument("--stage2_learning_rate", type=A.positive_float, default=None,
                   help="joint: the ControlNet's learning rate in stage 2 (default 0.1 x --learning_rate)")
    s.add_argument("--stage2_loss_weight_factor", type=A.non_negative_float, default=None,
                   help="joint: --loss_weight_factor of stage 2 (default: stage 1's)")
    s.add_argument("--from_scratch", action="store_true", help="joint: train stage 1 again even if it finished")

    e = parser.add_argument_group("early stopping and checkpoints")
    e.add_argument("--early_stopping_patience", type=A.positive_int, default=None,
                   help="stop after this many epochs without improvement of the validation loss (or, without a "
                        "validation split, of the epoch mean of the weighted training loss)")
    e.add_argument("--early_stopping_min_delta", type=A.non_negative_float, default=0.0,
                   help="smallest decrease that counts as an improvement")
    e.add_argument("--checkpoints_total_limit", type=A.positive_int, default=None,
                   help="keep only the last N numbered checkpoints (--save_steps is --save_every_n_steps)")
    return parser


ALIASES = {"--config": "--config_file", "--save_steps": "--save_every_n_steps",
           "--resume_from_checkpoint": "--resume", "--batch_size": "--train_batch_size",
           "--num_epochs": "--max_train_epochs"}


# The other trainers' dataset flags that ControlNet training cannot use. They are not in the parser
# (so the GUI shows no field for them); passing one gives the reason instead of argparse's bare error.
REFUSED = {
    "--reg_data_dir": ("regularization images (--reg_data_dir) have no condition, so a ControlNet cannot train "
                       "on them.", "drop --reg_data_dir."),
    "--dataset_config": ("--dataset_config is not supported for ControlNet training.",
                         "use --train_data_dir with --conditioning_data_dir, or a --train_listing."),
}


def refuse_unsupported(argv) -> None:
    from library.errors import UserError

    for arg in argv:
        flag = arg.partition("=")[0]
        if flag in REFUSED:
            raise UserError(REFUSED[flag][0], fix=REFUSED[flag][1])


def normalise_argv(argv) -> list[str]:
    """The spellings of a few flags in the radar recipe's YAML, the Lightning COCO inpainting scripts
    and diffusers' examples."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(ALIASES.get(flag, flag) + eq + value if flag in ALIASES else arg)
    return out


def main(argv=None):
    from library.controlnet.config import parse_args

    argv = normalise_argv(sys.argv[1:] if argv is None else argv)
    refuse_unsupported(argv)
    args = parse_args(setup_parser(), argv)
    from library.controlnet.stages import train

    train(args)
    return 0


#!/usr/bin/env python
"""Train the pose-conditioned image-to-image model (source face + target pose -> face at that pose).

    python train_image_controlnet.py --data_dir faces --epochs 100 --batch_size 16 --lr 1e-4
    python train_image_controlnet.py data_dir faces epochs 100 batch_size 16 lr 1e-4   # seed style
    python train_image_controlnet.py --data_dir faces --check_data                    # validate only

The data folder holds front_metadata.json, front_keypoints.npy, video_metadata.json and
video_keypoints.npy (schema: README, "ImageControlNet"). Every option can come from a TOML file
with --config_file. Several processes: accelerate launch --num_processes N train_image_controlnet.py ...
"""
from __future__ import annotations

import argparse
import sys

from library import args as A
from library.errors import UserError, run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a pose-conditioned image generator (ImageControlNet).")
    A.add_config_arguments(parser)

    d = parser.add_argument_group("data")
    d.add_argument("--data_dir", type=str, default=None,
                   help="folder with front/video metadata (.json) and keypoints (.npy) (required)")
    d.add_argument("--image_dir", type=str, default=None,
                   help="folder the metadata's image paths are relative to (default: --data_dir)")
    d.add_argument("--batch_size", type=A.positive_int, default=16,
                   help="batch size per process (under accelerate launch --num_processes N a batch holds N x this)")
    d.add_argument("--num_workers", type=A.non_negative_int, default=4, help="DataLoader worker processes")
    d.add_argument("--image_size", type=A.positive_int, default=112,
                   help="image side in pixels (112 = InsightFace's aligned crops)")
    d.add_argument("--val_fraction", "--val_split", type=A.unit_float, default=0.1,
                   help="share of identities held out for validation when the metadata has no \"split\"; the same "
                        "ones for the same --seed (Lightning's --val_split works too)")
    d.add_argument("--check_data", action="store_true",
                   help="only check the data folder (files, schema, keypoints, every image) and report problems")

    m = parser.add_argument_group("model")
    m.add_argument("--backbone", type=str, default="iresnet50",
                   choices=["resnet50", "iresnet50", "iresnet100", "small"],
                   help="image feature backbone (small: a light encoder for tests and tiny data)")
    m.add_argument("--backbone_weights", type=str, default=None,
                   help="local weights for the backbone: InsightFace arcface iresnet .pth (or a state dict "
                        "converted from .onnx), or torchvision's ImageNet resnet50 state dict; "
                        "without it the backbone starts random (with a warning)")
    m.add_argument("--freeze_backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the backbone's weights fixed (default: on when --backbone_weights is given)")
    m.add_argument("--feature_dim", type=A.positive_int, default=512, help="channels of the generator's input features")
    m.add_argument("--pose_dim", type=int, default=3, choices=[1, 2, 3],
                   help="angles used: 3 = yaw, pitch, roll (1 = yaw only, 2 = yaw and pitch)")
    m.add_argument("--num_control_layers", type=A.positive_int, default=3,
                   help="generator stages that receive the pose through the control branch")
    m.add_argument("--freeze_generator", action="store_true",
                   help="keep the generator fixed; train the control branch, encoder and pose head (stage 1)")

    t = parser.add_argument_group("training")
    t.add_argument("--epochs", "--max_epochs", type=A.positive_int, default=100, help="epochs to train")
    t.add_argument("--lr", type=A.positive_float, default=1e-4, help="AdamW learning rate (cosine decay to 0)")
    t.add_argument("--lr_warmup_steps", type=A.non_negative_int, default=0, help="linear warmup steps")
    t.add_argument("--weight_decay", type=A.non_negative_float, default=1e-5, help="AdamW weight decay")
    t.add_argument("--pose_loss_weight", type=A.non_negative_float, default=0.1,
                   help="weight of the pose head's loss added to the image loss")
    t.add_argument("--loss_type", type=str, default="mse", choices=["mse", "l1", "combined"],
                   help="image loss (combined = (MSE + L1) / 2)")
    t.add_argument("--use_amp", action="store_true",
                   help="mixed precision: fp16 on a CUDA GPU, bf16 autocast on the CPU")
    t.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="mixed precision by name: bf16 autocast (GPU or CPU) or fp16 (CUDA only, with loss "
                        "scaling; without CUDA training runs in fp32); no: --use_amp decides. Lightning's "
                        "--precision 16-mixed|bf16-mixed|32 is accepted too")
    A.add_precision_alias(t)
    t.add_argument("--gradient_accumulation_steps", "--accumulate_grad_batches", type=A.positive_int, default=1,
                   help="batches accumulated into one optimizer step (effective batch = batch_size x this; "
                        "Lightning's --accumulate_grad_batches works too)")
    t.add_argument("--max_grad_norm", "--gradient_clip_val", type=A.non_negative_float, default=1.0,
                   help="gradient clipping; 0 = off (Lightning's --gradient_clip_val works too)")
    t.add_argument("--seed", type=int, default=42, help="random seed (data order, initial weights, split)")
    t.add_argument("--resume", "--resume_from_checkpoint", type=str, default=None,
                   help="continue from best_model.pth or checkpoint_epoch_N.pth (a different freeze setting "
                        "starts a new stage from its weights; Lightning's --resume_from_checkpoint works too)")

    s = parser.add_argument_group("saving and logging")
    s.add_argument("--save_dir", type=str, default="checkpoints_image", help="folder for checkpoints and curve PNGs")
    s.add_argument("--log_dir", type=str, default="logs_image", help="TensorBoard log folder")
    s.add_argument("--save_interval", type=A.positive_int, default=10,
                   help="write checkpoint_epoch_N.pth and training_curves_epoch_N.png every N epochs")
    s.add_argument("--image_log_interval", type=A.positive_int, default=10,
                   help="log Images/Comparison to TensorBoard every N epochs")
    # Lightning's step-based names: these count optimizer steps, --image_log_interval epochs
    s.add_argument("--log_images_every_n_steps", type=A.positive_int, default=None,
                   help="log Images/Comparison every N optimizer steps instead (TensorBoard step = optimizer step), "
                        "in place of --image_log_interval")
    s.add_argument("--log_every_n_steps", type=A.positive_int, default=50,
                   help="log Step/TrainLoss (the main process's loss of that step) and Step/LR every N optimizer "
                        "steps, besides the per-epoch Epoch/* scalars")
    s.add_argument("--profile", action="store_true",
                   help="profile optimizer steps 3-7: print where the time goes and save profile_trace.json in "
                        "--save_dir")
    A.add_trainer_automation_arguments(
        parser, top_k_files="top_epoch_N.pth in --save_dir, listed in top_k.json",
        monitor_names="val_loss (the default with validation pairs), train_loss (the default without), "
                      "val_image_loss, val_psnr (with --monitor_mode max), val_pose_error_deg, train_image_loss ...")
    return parser


def check_data(args) -> int:
    from library.image_controlnet.data import scan

    report = scan(args.data_dir, args.image_dir, val_fraction=args.val_fraction, seed=args.seed, check_images=True)
    for note in report.notes:
        print(note)
    if not report.problems:
        print(f"{args.data_dir}: no problems found.")
        return 0
    print(f"{args.data_dir}: {len(report.problems)} problem(s):", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def main(argv=None):
    from library.image_controlnet.argv import normalize_bare_pairs

    parser = setup_parser()
    argv, converted = normalize_bare_pairs(parser, list(sys.argv[1:] if argv is None else argv))
    if converted:
        print(f"note: read {', '.join(converted)} as --{', --'.join(converted)}", file=sys.stderr)
    args = A.parse_args(parser, argv)
    if not args.data_dir:
        raise UserError("--data_dir is required.", fix="pass the folder holding front_metadata.json and "
                                                       "video_metadata.json: --data_dir path/to/data.")
    if args.check_data:
        return check_data(args)
    from library.image_controlnet.train import train

    train(args, defaults={a.dest: a.default for a in parser._actions})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

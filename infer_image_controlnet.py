#!/usr/bin/env python
"""Render a face at a new pose with a model trained by train_image_controlnet.py.

    python infer_image_controlnet.py --checkpoint checkpoints_image/best_model.pth \
        --source_image face.png --yaw 30 --pitch 0 --roll 0 --output face_yaw30.png
    python infer_image_controlnet.py --checkpoint best_model.pth --source_image face.png \
        --pose_file poses.json --output out.png        # writes out_000.png, out_001.png, ...

Angles are degrees in the convention of the training data (docs/train_image_controlnet.md: yaw > 0 turns the face to the
image's right). A pose file is JSON ([[yaw, pitch, roll], ...] or [{"yaw": .., "pitch": .., "roll": ..}]),
.npy ([N, 3]) or text (one "yaw pitch roll" per line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from library import args as A
from library.errors import UserError, run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate a face at a target pose (ImageControlNet).")
    A.add_config_arguments(parser)
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="best_model.pth or checkpoint_epoch_N.pth (required)")
    parser.add_argument("--source_image", type=str, default=None, help="the source face (an aligned crop) (required)")
    parser.add_argument("--yaw", type=float, default=0.0, help="target yaw, degrees")
    parser.add_argument("--pitch", type=float, default=0.0, help="target pitch, degrees")
    parser.add_argument("--roll", type=float, default=0.0, help="target roll, degrees")
    parser.add_argument("--pose_file", type=str, default=None,
                        help="several target poses (JSON, .npy or text); replaces --yaw/--pitch/--roll")
    parser.add_argument("--output", type=str, default="generated.png",
                        help="output image; with several poses _000, _001, ... are added to the name")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    return parser


POSE_FILE_FIX = 'write [[yaw, pitch, roll], ...] in JSON, an [N, 3] .npy, or "yaw pitch roll" lines.'


def read_pose_file(path) -> list[list[float]]:
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserError(f"the --pose_file {path} does not exist.", path=path, fix="pass an existing pose file.")
    try:
        if path.suffix.lower() == ".npy":
            rows = np.load(path, allow_pickle=False).tolist()
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = [[d["yaw"], d["pitch"], d["roll"]] if isinstance(d, dict) else d for d in data]
        else:
            rows = [line.replace(",", " ").split() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        poses = [[float(v) for v in row] for row in rows]
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read poses from {path} ({type(err).__name__}: {err}).", path=path,
                        fix=POSE_FILE_FIX) from None
    if not poses or any(len(p) != 3 for p in poses):
        raise UserError(f"{path} must hold one or more poses of 3 angles (yaw, pitch, roll).", path=path,
                        fix=POSE_FILE_FIX)
    return poses


def output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix or '.png'}") for i in range(count)]


def main(argv=None):
    parser = setup_parser()
    args = A.parse_args(parser, argv)
    if not args.checkpoint or not args.source_image:
        raise UserError("--checkpoint and --source_image are required.",
                        fix="pass --checkpoint best_model.pth --source_image face.png --yaw 30.")
    import torch

    from library.image_controlnet.checkpoint import load_model
    from library.image_controlnet.dataset import load_image, save_image
    from library.image_controlnet.model import POSE_SCALE

    if not Path(args.source_image).is_file():
        raise UserError(f"the --source_image {args.source_image} does not exist.", path=args.source_image,
                        fix="pass an existing image file.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available.", fix="use --device cpu or auto.")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model, _ = load_model(args.checkpoint, device)
    poses = read_pose_file(args.pose_file) if args.pose_file else [[args.yaw, args.pitch, args.roll]]
    dims = model.config.pose_dim
    source = load_image(args.source_image, model.config.image_size).unsqueeze(0).to(device)
    paths = output_paths(args.output, len(poses))
    with torch.no_grad():
        for pose, path in zip(poses, paths):
            if max(abs(a) for a in pose) > 90:
                from library.logs import warn_once

                warn_once("a target angle beyond 90 degrees is far outside what face data covers; expect a poor image.")
            target = torch.tensor([pose[:dims]], dtype=torch.float32, device=device)
            image, predicted = model(source, target)
            save_image(image[0], path)
            read = ", ".join(f"{v:.1f}" for v in (predicted[0] * POSE_SCALE).tolist())
            print(f"wrote {path} (target {', '.join(f'{a:g}' for a in pose[:dims])}; pose head reads {read})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

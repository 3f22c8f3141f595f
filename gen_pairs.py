#!/usr/bin/env python
"""Generate image pairs from a train_dual_unet.py checkpoint: one initial noise per pair, each
modality denoised by its own UNet + LoRA.

    python gen_pairs.py --checkpoint_dir results/260224_dual_unet_v27/best_checkpoint \
        --num_samples 100 --steps 50 --seed 42 --output_dir generated_cffa

Writes OUTPUT/<a>/0000.png and OUTPUT/<b>/0000.png (a new paired dataset in the --data_dir layout),
OUTPUT/pair_0000.png (the two side by side), OUTPUT/grid.png (the first --grid_pairs pairs) and
OUTPUT/generation.json (settings and seeds). Pair i starts from seed + i. (`test_gen.py` is the
same script under the name the original CF/FA dual-UNet scripts used.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library import args as A
from library.errors import run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate registered image pairs with a dual-UNet checkpoint.")
    A.add_config_arguments(parser)
    parser.add_argument("--checkpoint_dir", type=str, default=None,
                        help="a checkpoint folder of train_dual_unet.py (best_checkpoint/ or latest_checkpoints/step_N/)")
    parser.add_argument("--num_samples", type=A.positive_int, default=10, help="number of pairs")
    parser.add_argument("--steps", type=A.positive_int, default=50, help="denoising steps")
    parser.add_argument("--seed", type=int, default=42, help="pair i starts from the noise of seed + i")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="where to write (default: generated_<checkpoint name> beside the checkpoint)")
    parser.add_argument("--batch_size", type=A.positive_int, default=4, help="pairs generated at once")
    parser.add_argument("--sampler", type=str, default="ddim",
                        choices=["ddim", "euler", "euler_a", "dpmsolver++", "pndm", "lms", "heun", "ddpm"],
                        help="sampler")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="the base model, if it moved since training (default: the path in dual_unet.json)")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                        help="dtype of the model while generating (fp16 needs CUDA)")
    parser.add_argument("--independent_noise", action="store_true",
                        help="start the second modality from other noise (a baseline: pairs then share no structure)")
    parser.add_argument("--grid_pairs", type=A.non_negative_int, default=16, help="pairs shown in grid.png")
    return parser


def main(argv=None) -> int:
    args = A.parse_args(setup_parser(), argv)
    from library.errors import UserError

    if not args.checkpoint_dir:
        raise UserError("--checkpoint_dir is missing.", fix="pass a checkpoint folder written by train_dual_unet.py.")
    import numpy as np
    import torch
    from tqdm import tqdm

    from library.dual_unet.model import load_for_generation, read_info
    from library.dual_unet.sampling import generate_pairs, grid, save_pairs, save_png
    from library.fileio import write_json_atomic
    from library.training.accel import resolve_mixed_precision

    ckpt = Path(args.checkpoint_dir)
    info = read_info(ckpt)  # a wrong folder fails before any model loads
    out = Path(args.output_dir) if args.output_dir else ckpt.resolve().parent / f"generated_{ckpt.resolve().name}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = resolve_mixed_precision(args.mixed_precision, device.type)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    model, dual, info = load_for_generation(ckpt, args.pretrained_model_name_or_path, device, dtype)
    seeds = [args.seed + i for i in range(args.num_samples)]
    shown = [[], []]
    with tqdm(total=len(seeds), desc="pairs", unit="pair") as bar:
        for k in range(0, len(seeds), args.batch_size):
            a, b = generate_pairs(model, dual, seeds[k:k + args.batch_size], resolution=info["resolution"],
                                  steps=args.steps, device=device, dtype=dtype, batch_size=args.batch_size,
                                  independent=args.independent_noise, sampler=args.sampler)
            save_pairs(out, a, b, dual.modalities, separate=True, start=k, with_grid=False)  # kept as they come
            for side, images in enumerate((a, b)):
                shown[side] += list(images[:max(0, args.grid_pairs - len(shown[side]))])
            bar.update(len(a))
    if shown[0]:
        save_png(grid(np.stack(shown[0]), np.stack(shown[1])), out / "grid.png")
    write_json_atomic(out / "generation.json", {"checkpoint_dir": str(ckpt.resolve()), "seeds": seeds,
                                                "steps": args.steps, "sampler": args.sampler,
                                                "independent_noise": args.independent_noise,
                                                "modalities": list(dual.modalities), "checkpoint_info": info})
    print(f"{len(seeds)} pairs in {out} ({dual.modalities[0]}/, {dual.modalities[1]}/, pair_*.png, grid.png)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

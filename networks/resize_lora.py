#!/usr/bin/env python
"""Reduce the rank of a LoRA by SVD (kohya's networks/resize_lora.py).

    python networks/resize_lora.py --model big.safetensors --new_rank 8 --save_to small.safetensors
    python networks/resize_lora.py --model big.safetensors --new_rank 32 --dynamic_method sv_fro \
        --dynamic_param 0.9 --save_to dynamic.safetensors

Prints, per module, the new rank and the share of the delta's Frobenius norm it keeps. A LoHa or
LoKr file becomes a plain LoRA of the new rank (SVD of each delta, the error printed); a DoRA file
keeps its dora_scale (its low-rank part is resized).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/resize_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.lora_tools import cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reduce the rank of a LoRA by SVD.")
    A.add_config_arguments(parser)
    parser.add_argument("--model", type=str, default=None, help="the LoRA file to resize")
    parser.add_argument("--new_rank", type=A.positive_int, default=4,
                        help="new rank (with --dynamic_method: the largest rank allowed)")
    parser.add_argument("--new_conv_rank", type=A.positive_int, default=None,
                        help="new rank of the LoCon 3x3 conv modules (default: --new_rank)")
    parser.add_argument("--dynamic_method", type=str, default=None, choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                        help="choose each module's rank: sv_ratio keeps singular values > largest / param; "
                             "sv_fro keeps the fewest that hold param of the Frobenius norm; sv_cumulative "
                             "the fewest that hold param of the sum of singular values")
    parser.add_argument("--dynamic_param", type=A.positive_float, default=None,
                        help="the --dynamic_method's target (sv_ratio: >= 1, e.g. 4; sv_fro/sv_cumulative: "
                             "a share in (0, 1], e.g. 0.9)")
    cli.add_output_arguments(parser, "resized LoRA", default_precision="that of --model")
    parser.add_argument("--verbose", action="store_true",
                        help="accepted for kohya compatibility; the per-module lines are always printed")
    cli.add_device_argument(parser)
    return parser


def check_dynamic(method, param) -> None:
    if method is None and param is not None:
        raise UserError("--dynamic_param needs --dynamic_method.", fix="add --dynamic_method sv_fro (or sv_ratio, sv_cumulative).")
    if method is not None and param is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param.",
                        fix="add e.g. --dynamic_param 4 for sv_ratio, 0.9 for sv_fro or sv_cumulative.")
    if method == "sv_ratio" and param < 1:
        raise UserError(f"--dynamic_param for sv_ratio must be >= 1 (got {param}).",
                        fix="pass the ratio of the largest to the smallest kept singular value, e.g. 4.")
    if method in ("sv_fro", "sv_cumulative") and param > 1:
        raise UserError(f"--dynamic_param for {method} must be a share in (0, 1] (got {param}).",
                        fix="pass e.g. --dynamic_param 0.9.")


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if not args.model:
        raise UserError("no LoRA file given.", fix="pass --model with the LoRA file to resize.")
    check_dynamic(args.dynamic_method, args.dynamic_param)
    save_to = cli.check_output_path(args.save_to, args.overwrite)
    device = cli.compute_device(args.device)

    from library.lora_tools import lowrank
    from library.lora_tools.weights import lora_metadata, read_lora, write_lora

    lora = read_lora(args.model)
    modules, changes = lowrank.resize(lora, args.new_rank, args.new_conv_rank, args.dynamic_method,
                                      args.dynamic_param, device)
    for change in changes:
        print(change.format())
    print(lowrank.summary(changes))

    old_dim = lora.metadata.get("ss_network_dim", "?")
    how = (f"dynamic resize with {args.dynamic_method} {args.dynamic_param}" if args.dynamic_method
           else f"resized to rank {args.new_rank}")
    meta = {**lora.metadata, **lora_metadata(modules, save_to)}
    meta["ss_training_comment"] = f"{how} from rank {old_dim}; {lora.metadata.get('ss_training_comment', 'None')}"
    if args.dynamic_method:
        meta["ss_network_dim"] = "Dynamic"  # as kohya writes it
    write_lora(save_to, modules, cli.save_dtype(args.save_precision) if args.save_precision else lora.dtype, meta)
    print(f"saved {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

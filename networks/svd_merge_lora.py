#!/usr/bin/env python
"""Merge LoRA files into one LoRA of a new rank by SVD (kohya's networks/svd_merge_lora.py).

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \
        --new_rank 16 --new_conv_rank 8 --save_to ab16.safetensors

Each module's ratio-weighted sum of deltas is truncated to its best rank-k approximation; the
printed error per module is exactly what the truncation dropped. LoHa and LoKr files mix in by
their deltas (so one LoHa file alone is converted to a plain LoRA); DoRA needs the base model
(merge_lora.py --sd_model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/svd_merge_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.lora_tools import cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge LoRAs into one LoRA of a new rank by SVD.")
    A.add_config_arguments(parser)
    parser.add_argument("--models", type=str, nargs="*", default=None, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="one ratio (multiplier) per LoRA file (default 1 each)")
    parser.add_argument("--new_rank", type=A.positive_int, default=4, help="rank of the merged LoRA")
    parser.add_argument("--new_conv_rank", type=A.positive_int, default=None,
                        help="rank of the LoCon 3x3 conv modules (default: --new_rank)")
    cli.add_output_arguments(parser, "merged LoRA")
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                        help="accepted for kohya compatibility; the SVD is always computed in fp32")
    parser.add_argument("--v2", action="store_true", help="accepted for kohya compatibility (no effect)")
    parser.add_argument("--lbws", type=str, nargs="*", default=None,
                        help='per-block weights for each model, as JSON lists of 17 numbers (BASE, IN01 IN02 IN04 IN05 '
                             'IN07 IN08, MID, OUT03-OUT11) or 26, e.g. "[1,1,1,1,1,1,1,1,0,0,0,1,1,1,1,1,1]"')
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    ratios = cli.ratios_for(args.models, args.ratios)
    save_to = cli.check_output_path(args.save_to, args.overwrite)
    device = cli.compute_device(args.device)

    from library.lora_tools import lowrank
    from library.lora_tools.combine import group_modules, parse_lbws, weight_blocks
    from library.lora_tools.weights import lora_metadata, merge_sources, read_lora, write_lora

    loras = [weight_blocks(read_lora(path), lbw) for path, lbw in zip(args.models, parse_lbws(args.lbws, len(args.models)))]
    modules, changes = lowrank.svd_merge(group_modules(loras, ratios), args.new_rank, args.new_conv_rank, device)
    for change in changes:
        print(change.format())
    print(lowrank.summary(changes))
    meta = lora_metadata(modules, save_to, {"ss_merged_from": json.dumps(merge_sources(loras, ratios))})
    write_lora(save_to, modules, cli.save_dtype(args.save_precision), meta)
    print(f"saved {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

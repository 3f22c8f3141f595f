#!/usr/bin/env python
"""Show what a LoRA file holds, or check it against the file contract (kohya's networks/check_lora_weights.py).

    python networks/check_lora_weights.py my_lora.safetensors           # modules, ranks, alphas, norms, metadata
    python networks/check_lora_weights.py --verify a.safetensors b.safetensors

LoHa, LoKr and DoRA files (LyCORIS keys) are shown and verified too.
--verify lists what would make WebUI, ComfyUI, diffusers or sd-scripts load a file wrongly (names
they drop silently, missing or zero alpha, rank or shape mismatches, NaN/Inf, a stale
sshs_model_hash, text-encoder names without text_model_) and exits with status 1 if anything is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/check_lora_weights.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import run_cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Show or verify LoRA files.")
    A.add_config_arguments(parser)
    parser.add_argument("file", type=str, nargs="+", help="LoRA file(s) (.safetensors, .ckpt, .pt)")
    parser.add_argument("-s", "--show_all_keys", "--show_all", dest="show_all", action="store_true",
                        help="also list every tensor, and metadata values in full")
    parser.add_argument("--verify", action="store_true",
                        help="check the file contract; exit with status 1 and a list of problems if broken")
    return parser


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if args.verify:
        from library.lora_tools.verify import verify_lora_file

        reports = [verify_lora_file(path) for path in args.file]
        for report in reports:
            print(report.format())
        return 0 if all(r.ok for r in reports) else 1
    from library.lora_tools.describe import describe

    for path in args.file:
        print(describe(path, args.show_all))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

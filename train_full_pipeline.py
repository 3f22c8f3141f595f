#!/usr/bin/env python
"""The whole recipe in one command: a ControlNet (stage 1), then a UNet LoRA on it (stage 2).

    python train_full_pipeline.py --controlnet_config config.yaml --lora_config config_lora.yaml
    python train_full_pipeline.py --controlnet_config config.yaml --lora_config config_lora.yaml --from_scratch

A finished stage 1 is skipped (unless --from_scratch); the stage-1 ControlNet path is written into
config_lora_autofilled.yaml (beside config_lora.yaml), which stage 2 runs from. A pipeline that was
stopped continues where it stopped: a half-finished stage resumes from its newest state folder.
Flags after `--` go to both stages (e.g. `-- --mixed_precision bf16`).
"""
from __future__ import annotations

import argparse
import sys

from library.errors import run_cli


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a ControlNet, then a UNet LoRA on the frozen ControlNet.")
    parser.add_argument("--controlnet_config", required=True, help="stage-1 config (.yaml or .toml)")
    parser.add_argument("--lora_config", required=True, help="stage-2 config (.yaml or .toml)")
    parser.add_argument("--from_scratch", action="store_true", help="train stage 1 again even if it finished")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = setup_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    from library.controlnet.pipeline import run_pipeline

    run_pipeline(args.controlnet_config, args.lora_config, from_scratch=args.from_scratch, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

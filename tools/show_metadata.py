#!/usr/bin/env python
"""Print a .safetensors file's metadata as sorted, indented JSON (kohya's tools/show_metadata.py).

    python tools/show_metadata.py --model my_lora.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/show_metadata.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Show the metadata of a .safetensors file.")
    A.add_config_arguments(parser)
    parser.add_argument("--model", type=str, default=None, help="the .safetensors file")
    return parser


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if not args.model:
        raise UserError("no file given.", fix="pass --model FILE.safetensors.")
    from library.models.checkpoint_io import check_exists, read_safetensors_metadata

    path = check_exists(args.model, "file", flag="--model")
    if path.suffix.lower() != ".safetensors":
        raise UserError("only .safetensors files carry metadata.", path=path, fix="pass a .safetensors file.")
    metadata = read_safetensors_metadata(path)
    if not metadata:
        print("No metadata found", file=sys.stderr)
        return 1
    print(json.dumps(metadata, indent=4, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Convert a Stable Diffusion 1.x/2.x model between a diffusers folder and one checkpoint file, either way
(kohya's tools/convert_diffusers20_original_sd.py; same arguments).

    python tools/convert_diffusers20_original_sd.py model.safetensors model_diffusers   # file -> folder
    python tools/convert_diffusers20_original_sd.py model_diffusers model.safetensors   # folder -> file

As kohya: a target with a file extension is written as a checkpoint, one without as a diffusers folder.
SD1 or SD2 is read from the weights (--v1/--v2 are accepted and checked against them).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/convert_diffusers20_original_sd.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert between a diffusers folder and a checkpoint file.")
    A.add_config_arguments(parser)
    parser.add_argument("--v1", action="store_true", help="the model is SD1.x (detected from the weights anyway)")
    parser.add_argument("--v2", action="store_true", help="the model is SD2.x (detected from the weights anyway)")
    parser.add_argument("--unet_use_linear_projection", action="store_true",
                        help="accepted for kohya compatibility: SD2 U-Nets are written as their weights are")
    parser.add_argument("--fp16", action="store_true", help="save the checkpoint in fp16")
    parser.add_argument("--bf16", action="store_true", help="save the checkpoint in bf16")
    parser.add_argument("--float", action="store_true", help="save the checkpoint in float32")
    parser.add_argument("--save_precision_as", type=str, default=None, choices=["fp16", "bf16", "float"],
                        help="dtype of the saved checkpoint (instead of --fp16/--bf16/--float)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch written into the checkpoint's metadata")
    parser.add_argument("--global_step", type=int, default=0, help="step written into the checkpoint's metadata")
    parser.add_argument("--metadata", type=str, default=None,
                        help="metadata for the checkpoint as a Python/JSON dict, e.g. '{\"name\": \"x\"}'")
    parser.add_argument("--variant", type=str, default=None, help="accepted for kohya compatibility (no effect)")
    parser.add_argument("--reference_model", type=str, default=None,
                        help="accepted for kohya compatibility: the scheduler and tokenizer files ship with this project")
    parser.add_argument("--use_safetensors", action="store_true",
                        help="accepted for kohya compatibility: diffusers folders are always written as .safetensors")
    parser.add_argument("model_to_load", type=str, help="checkpoint file or diffusers folder to read")
    parser.add_argument("model_to_save", type=str,
                        help="checkpoint file (with an extension) or diffusers folder (without) to write")
    return parser


def save_dtype(args):
    import torch

    flags = [name for name in ("fp16", "bf16", "float") if getattr(args, name)]
    if args.save_precision_as:
        flags.append(args.save_precision_as)
    if len(set(flags)) > 1:
        raise UserError(f"several save precisions given ({', '.join(flags)}).", fix="pass only one of them.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(flags[0]) if flags else None


def read_metadata_flag(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = ast.literal_eval(text)  # kohya eval()s it; a literal is all a dict of strings needs
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--metadata is not a dict: {text!r}.", fix="write it as '{\"name\": \"model\"}'.")
    return {str(k): str(v) for k, v in value.items()}


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if args.v1 and args.v2:
        raise UserError("--v1 and --v2 exclude each other.", fix="pass at most one of them.")
    dtype = save_dtype(args)
    metadata = read_metadata_flag(args.metadata)
    target = Path(args.model_to_save)
    to_file = target.suffix != ""
    if target.exists() and not to_file:
        raise UserError("the output folder exists already.", path=target, fix="pass a new folder name.")

    from library.models.loading import load_sd_model
    from library.models.saving import save_diffusers, save_sd_checkpoint

    model = load_sd_model(args.model_to_load, v2=args.v2)
    if to_file:
        metadata = {"ss_epoch": str(args.epoch), "ss_steps": str(args.global_step), **metadata}
        save_sd_checkpoint(target, model.unet, model.text_encoder, model.vae, dtype, metadata=metadata, v2=model.v2)
        print(f"saved {'SD2' if model.v2 else 'SD1'} checkpoint {target}")
    else:
        if dtype is not None or metadata:
            print("note: --fp16/--bf16/--float/--metadata apply to checkpoint files; the folder keeps the weights' "
                  "dtype (as kohya)")
        save_diffusers(model, target)
        print(f"saved {'SD2' if model.v2 else 'SD1'} diffusers folder {target}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

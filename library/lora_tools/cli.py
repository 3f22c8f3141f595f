"""Flags and checks shared by the networks/ scripts: output file, precision, ratios, device.

All checks run before any model or LoRA is read, so a wrong path fails in a second.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import check_writable_dir

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def add_output_arguments(parser: argparse.ArgumentParser, what: str, default_precision: str = "float") -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--save_to", type=str, default=None, help=f"file to write the {what} to (.safetensors)")
    g.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help=f"dtype of the saved weights (default: {default_precision})")
    g.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=str, default=None,
                        help="device for the computation, e.g. cuda (default: cpu); the result is saved from the CPU")


def check_output_path(path, overwrite: bool, suffixes=LORA_SUFFIXES, flag: str = "--save_to") -> Path:
    if not path:
        raise UserError("no output file given.", fix=f"pass {flag} with the file to write.")
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"cannot save as '{path.name}': unknown file type.", path=path,
                        fix=f"end the {flag} file name with {' or '.join(suffixes)}.")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder.", path=path, fix=f"pass a file name with {flag}.")
    if path.exists() and not overwrite:
        raise UserError(f"the output file {path} already exists.", path=path,
                        fix="pass another file name, or add --overwrite to replace it.")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def save_dtype(name: str | None) -> torch.dtype:
    return PRECISIONS[name or "float"]


def ratios_for(models: list, ratios: list | None, models_flag: str = "--models",
               ratios_flag: str = "--ratios") -> list[float]:
    """One ratio per model; all 1.0 when none are given."""
    if not models:
        raise UserError("no LoRA files given.", fix=f"pass {models_flag} a.safetensors [b.safetensors ...].")
    if not ratios:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"{ratios_flag} has {len(ratios)} values for {len(models)} files in {models_flag}.",
                        fix=f"give one {ratios_flag} value per file, in the same order.")
    return [float(r) for r in ratios]


def compute_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name.", fix="pass cpu or cuda (or cuda:1 ...).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for a CUDA GPU, but torch sees none.",
                        fix="leave out --device to compute on the CPU.")
    return device

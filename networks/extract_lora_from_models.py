#!/usr/bin/env python
"""Extract a LoRA from the difference of two checkpoints (kohya's networks/extract_lora_from_models.py).

    python networks/extract_lora_from_models.py --model_org v1-5.safetensors --model_tuned finetune.safetensors \
        --dim 32 --conv_dim 8 --save_to extracted.safetensors

Each target layer's weight change is replaced by its best rank-`dim` approximation (SVD).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/extract_lora_from_models.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.lora_tools import cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract a LoRA from the difference of two Stable Diffusion models.")
    A.add_config_arguments(parser)
    parser.add_argument("--model_org", type=str, default=None,
                        help="the original model (single-file .safetensors/.ckpt or diffusers folder)")
    parser.add_argument("--model_tuned", type=str, default=None, help="the fine-tuned model, same layout rules")
    parser.add_argument("--v2", action="store_true", help="the models are SD2.x (not supported yet)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="the metadata says v-prediction (default: as --v2), as kohya")
    parser.add_argument("--load_original_model_to", type=str, default=None,
                        help="device the original model is loaded to (cpu, cuda, cuda:0; default cpu)")
    parser.add_argument("--load_tuned_model_to", type=str, default=None,
                        help="device the tuned model is loaded to (default cpu)")
    parser.add_argument("--dim", type=A.positive_int, default=4, help="rank of the LoRA")
    parser.add_argument("--conv_dim", type=A.positive_int, default=None,
                        help="rank of the LoCon 3x3 conv modules; without it only the attention and MLP "
                             "layers are extracted")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clip the LoRA factors' entries at this quantile of their absolute values "
                             "(1 = no clipping)")
    parser.add_argument("--min_diff", type=A.non_negative_float, default=0.01,
                        help="a part (text encoder, U-Net) whose largest weight change is at most this is left out")
    parser.add_argument("--load_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="dtype the models are loaded in (default float); differences are computed in fp32")
    cli.add_output_arguments(parser, "extracted LoRA")
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if not args.model_org or not args.model_tuned:
        raise UserError("extracting needs two models.", fix="pass --model_org (the original) and --model_tuned.")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile must be in (0, 1] (got {args.clamp_quantile}).",
                        fix="pass e.g. 0.99, or 1 for no clipping.")
    save_to = cli.check_output_path(args.save_to, args.overwrite)
    device = cli.compute_device(args.device)

    from library.lora_tools.extract import extract
    from library.lora_tools.weights import lora_metadata, modelspec_metadata, write_lora
    from library.training.metadata import base_model_version
    from library.models.loading import load_sd_model

    load_dtype = cli.save_dtype(args.load_precision)
    org = load_sd_model(args.model_org, v2=args.v2, dtype=load_dtype, device=args.load_original_model_to or "cpu")
    tuned = load_sd_model(args.model_tuned, v2=args.v2, dtype=load_dtype, device=args.load_tuned_model_to or "cpu")
    v_pred = args.v2 if args.v_parameterization is None else args.v_parameterization
    modules, notes = extract(org, tuned, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff, device)
    for note in notes:
        print(note)
    meta = lora_metadata(modules, save_to, {
        "ss_sd_model_name": org.model_name,
        "ss_training_comment": f"extracted from {tuned.model_name} - {org.model_name} with rank {args.dim}"
                               + (f", conv rank {args.conv_dim}" if args.conv_dim else ""),
        "ss_v2": str(org.v2), "ss_base_model_version": base_model_version(org.v2, v_pred),
        **modelspec_metadata(save_to, org.v2, v_pred)})
    write_lora(save_to, modules, cli.save_dtype(args.save_precision), meta)
    print(f"extracted {len(modules)} modules; saved {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

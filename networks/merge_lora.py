#!/usr/bin/env python
"""Merge LoRA files into a base model, or into one LoRA file (kohya's networks/merge_lora.py).

    python networks/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors \
        --ratios 0.7 0.5 --save_to merged.safetensors --save_precision fp16
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 --save_to ab.safetensors

Into a model: W += ratio * delta for every module (LoCon convs too), saved as a single-file
checkpoint in the original SD layout; any mix of LoRA, LoHa, LoKr and DoRA files (each module's
delta as networks/lycoris_format.py computes it; files are merged in order, so a DoRA module sees
the earlier files' changes, as in ComfyUI). Into one LoRA: the ranks are concatenated, so the
result applies exactly the ratio-weighted sum of the inputs (LoRA/LoCon only; for LoHa/LoKr use
svd_merge_lora.py --new_rank).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/merge_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.lora_tools import cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge LoRAs into a Stable Diffusion checkpoint, or into one LoRA.")
    A.add_config_arguments(parser)
    parser.add_argument("--sd_model", type=str, default=None,
                        help="base model (single-file .safetensors/.ckpt or diffusers folder); without it the "
                             "LoRAs are merged into one LoRA file")
    parser.add_argument("--v2", action="store_true", help="the base model is SD2.x (not supported yet)")
    parser.add_argument("--models", type=str, nargs="*", default=None, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="one ratio (multiplier) per LoRA file (default 1 each)")
    cli.add_output_arguments(parser, "merged checkpoint or LoRA")
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                        help="accepted for kohya compatibility; merging is always computed in fp32")
    parser.add_argument("--concat", action="store_true",
                        help="accepted for kohya compatibility; LoRAs are always merged by concatenating "
                             "their ranks, which is exact")
    parser.add_argument("--shuffle", action="store_true",
                        help="permute each module's rank dimension (the LoRA's effect is unchanged), as kohya")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write no sai ModelSpec metadata (a LoRA keeps kohya's minimum ss_* keys)")
    cli.add_device_argument(parser)
    return parser


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    ratios = cli.ratios_for(args.models, args.ratios)
    suffixes = cli.CHECKPOINT_SUFFIXES if args.sd_model else cli.LORA_SUFFIXES
    save_to = cli.check_output_path(args.save_to, args.overwrite, suffixes)
    device = cli.compute_device(args.device)
    dtype = cli.save_dtype(args.save_precision)

    from library.lora_tools.weights import merge_sources, modelspec_metadata, read_lora, shuffle_ranks

    loras = [read_lora(path) for path in args.models]
    if args.sd_model:
        from library.lora_tools.model_fit import merge_into_model
        from library.models.loading import load_sd_model
        from library.models.saving import save_sd_checkpoint

        model = load_sd_model(args.sd_model, v2=args.v2)
        merge_into_model(model.unet, model.text_encoder, loras, ratios, "--sd_model", device)
        recipe = {"type": "merge_lora", "base": model.model_name, "loras": merge_sources(loras, ratios)}
        meta = None if args.no_metadata else {
            "sd_merge_recipe": json.dumps(recipe),
            **modelspec_metadata(save_to, model.v2, args.v2, [args.sd_model, *args.models], kind="checkpoint")}
        save_sd_checkpoint(save_to, model.unet, model.text_encoder, model.vae, dtype, metadata=meta)
        print(f"merged {len(loras)} LoRA(s) into {args.sd_model}; saved {save_to}")
    else:
        from library.lora_tools.combine import concat_merge, group_modules
        from library.lora_tools.weights import lora_metadata, write_lora

        for lora in loras:
            others = lora.lycoris_modules()
            if others:
                raise UserError(
                    f"{lora.path} holds LoHa/LoKr/DoRA modules (e.g. {others[0]}), which cannot be merged into "
                    "one LoRA by stacking ranks.", path=lora.path,
                    fix="merge them into a checkpoint (--sd_model), or into one LoRA with svd_merge_lora.py "
                        "--new_rank N (LoHa/LoKr deltas are converted by SVD, with the error printed).")

        modules = concat_merge(group_modules(loras, ratios))
        if args.shuffle:
            modules = shuffle_ranks(modules)
        meta = lora_metadata(modules, save_to, {"ss_merged_from": json.dumps(merge_sources(loras, ratios))})
        if not args.no_metadata:
            meta.update(modelspec_metadata(save_to, merged_from=args.models))
        write_lora(save_to, modules, dtype, meta)
        ranks = sorted({m.rank for m in modules})
        print(f"merged {len(loras)} LoRA(s) into {len(modules)} modules of rank {ranks[0]}..{ranks[-1]}; "
              f"saved {save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

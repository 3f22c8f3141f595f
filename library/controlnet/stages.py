"""train_controlnet.py's body: argument checks, then one stage, or joint mode's two stages.

Joint mode ("two stages + light joint" in the radar recipe):
    <output_dir>/stage1/   ControlNet only, --loss_weight_factor, --max_train_steps / --max_train_epochs
    <output_dir>/stage2/   ControlNet (lr --stage2_learning_rate, default 0.1 x --learning_rate) and a UNet
                           LoRA (lr --lora_learning_rate) from the stage-1 ControlNet, --stage2_loss_weight_factor,
                           --stage2_max_train_steps / --stage2_max_train_epochs (default: stage 1's)
    <output_dir>/final/controlnet/ and final/lora/ (+ the single files)
A finished stage 1 (its training_complete.json) is not trained again unless --from_scratch, so a
killed joint run continues with stage 2; `--resume latest` continues a stage from its newest state.
"""
from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from library.controlnet import outputs
from library.errors import UserError
from library.fileio import atomic_dir
from library.training.accel import reset_accelerate


def check_arguments(args) -> None:
    if not args.pretrained_model_name_or_path:
        raise UserError("no base model given.", fix="pass --pretrained_model_name_or_path (a local .safetensors "
                                                    "checkpoint or diffusers folder), or model.path in the config.")
    if not args.output_dir:
        raise UserError("no output folder given.", fix="pass --output_dir (project.output_dir in the config).")
    if not (args.train_data_dir or args.train_listing or args.ann_file or args.image_dir):
        raise UserError("no training data given.",
                        fix="pass --train_data_dir (data.data_dir) with --conditioning_data_dir, or --train_listing, "
                            "or --image_dir with --ann_file for inpainting.")
    if args.joint and args.save_top_k:
        raise UserError("--save_top_k keeps one kind of file; joint mode trains two (ControlNet and LoRA).",
                        fix="drop --save_top_k (joint mode keeps best/ and numbered checkpoints), or train the "
                            "stages one at a time.")
    if args.train_unet_lora and args.joint:
        raise UserError("--train_unet_lora (LoRA on a frozen ControlNet) and --joint exclude each other.",
                        fix="pass one of them.")
    if args.train_unet_lora:
        if not args.controlnet_path:
            raise UserError("--train_unet_lora trains a LoRA on a frozen, already trained ControlNet, but no "
                            "--controlnet_path was given.", fix="pass --controlnet_path (controlnet.path in the "
                                                                "config) with the stage-1 controlnet/ folder.")
        if not Path(args.controlnet_path).exists():
            raise UserError("the --controlnet_path does not exist.", path=args.controlnet_path,
                            fix="pass the controlnet/ folder (or .safetensors) a ControlNet training run wrote.")
    source = args.controlnet_model_name_or_path
    if source and not Path(source).exists():
        raise UserError("the --controlnet_model_name_or_path does not exist.", path=source,
                        fix="pass a saved ControlNet folder or .safetensors file, or leave it out to start "
                            "from the base UNet.")
    if args.masked_loss:
        raise UserError("--masked_loss is not used by ControlNet training (the condition is not a loss mask).",
                        fix="drop --masked_loss; use --loss_weight_factor to weigh the loss by the condition.")
    if args.validation_split and not 0 <= args.validation_split < 1:
        raise UserError("--validation_split must be in [0, 1).", fix="pass e.g. --validation_split 0.1.")
    if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
        raise UserError("the --resume folder does not exist.", path=args.resume,
                        fix="pass a '-state' folder written by --save_state, or --resume latest.")


def stage_args(args, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **overrides})


def train(args) -> dict:
    check_arguments(args)
    args.output_name = args.output_name or "last"
    if args.seed is None:
        args.seed = random.randint(0, 2**31 - 1)
    from library.controlnet.trainer import run_stage

    if not args.joint:
        return run_stage(args, "unet_lora" if args.train_unet_lora else "controlnet")

    out = Path(args.output_dir)
    logs = Path(args.logging_dir) if args.logging_dir else None
    s1 = out / "stage1"
    if outputs.is_complete(s1) and not args.from_scratch:
        print(f"joint mode: stage 1 already finished in {s1} (--from_scratch trains it again).", flush=True)
    else:
        if args.from_scratch and s1.exists():
            shutil.rmtree(s1)
        run_stage(stage_args(args, output_dir=str(s1), logging_dir=str(logs / "stage1") if logs else None,
                             resume=_resume_for(args.resume, s1)), "controlnet")
        reset_accelerate()
    epochs, steps = args.max_train_epochs, args.max_train_steps
    if args.stage2_max_train_epochs:
        epochs = args.stage2_max_train_epochs
    elif args.stage2_max_train_steps:
        epochs, steps = None, args.stage2_max_train_steps
    s2 = out / "stage2"
    factor = args.loss_weight_factor if args.stage2_loss_weight_factor is None else args.stage2_loss_weight_factor
    result = run_stage(stage_args(
        args, output_dir=str(s2), logging_dir=str(logs / "stage2") if logs else None,
        controlnet_model_name_or_path=str(s1 / "controlnet"), max_train_epochs=epochs, max_train_steps=steps,
        learning_rate=args.stage2_learning_rate or 0.1 * args.learning_rate, loss_weight_factor=factor,
        lora_learning_rate=args.lora_learning_rate or args.learning_rate, resume=_resume_for(args.resume, s2)),
        "joint")
    result["final_dir"] = _publish_final(s2, out / "final", args.output_name)
    return result


def _resume_for(resume, stage_dir: Path):
    """--resume latest applies to every stage; a state folder only to the stage it belongs to."""
    if resume in (None, "latest"):
        return resume
    return resume if Path(resume).resolve().parent == stage_dir.resolve() else None


def _publish_final(stage2: Path, final: Path, name: str) -> Path:
    """final/ = stage 2's ControlNet and LoRA (folders and single files), replaced atomically."""
    with atomic_dir(final) as tmp:
        for sub in ("controlnet", "lora"):
            shutil.copytree(stage2 / sub, tmp / sub)
        for suffix in ("_controlnet.safetensors", "_lora.safetensors"):
            if (stage2 / f"{name}{suffix}").is_file():
                shutil.copy2(stage2 / f"{name}{suffix}", tmp / f"{name}{suffix}")
    print(f"joint mode: final ControlNet in {final / 'controlnet'}, final LoRA in {final / 'lora'}", flush=True)
    return final

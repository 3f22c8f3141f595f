"""The accelerate `Accelerator` for a run, and the dtype the frozen base weights use."""
from __future__ import annotations

import torch

from library.errors import UserError


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """fp16 needs CUDA: on other devices warn once and train in fp32 (kohya users pass fp16 by habit)."""
    if requested == "fp16" and device_type != "cuda":
        from library.logs import warn_once

        warn_once("--mixed_precision=fp16 needs a CUDA GPU; none was found, so training runs in fp32 "
                  "(--mixed_precision=bf16 is faster on a CPU).")
        return "no"
    return requested


def make_accelerator(args, tracker_dir: str | None = None):
    """Build the Accelerator; returns (accelerator, weight_dtype for frozen weights)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed = resolve_mixed_precision(args.mixed_precision, device_type)
    if args.full_fp16 and mixed != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision=fp16 on a CUDA GPU.",
                        fix="drop --full_fp16, or use --full_bf16 with --mixed_precision=bf16.")
    if args.full_bf16 and mixed != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision=bf16.", fix="add --mixed_precision=bf16.")
    log_with = None
    if tracker_dir:
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else (args.log_with or "tensorboard")
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=tracker_dir, logging_dir=tracker_dir) if tracker_dir else None,
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    return accelerator, weight_dtype

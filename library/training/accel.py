"""The accelerate `Accelerator` for a run, the dtype the frozen base weights use, and the trackers
(kohya's --log_with, --log_prefix, --log_tracker_name, --log_tracker_config, --log_config, wandb flags).

Layout as in kohya: TensorBoard writes to <logging_dir>/<log_prefix><time>/<tracker name>/; wandb
uses the tracker name as its project. wandb runs offline (WANDB_MODE=offline) unless the user set
WANDB_MODE, so a run never needs the network; `wandb sync` uploads it later.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

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
    log_with = tracker_types(args) if tracker_dir else None
    if log_with and "wandb" in log_with:
        prepare_wandb(args, tracker_dir)
    if log_with and getattr(args, "log_tracker_config", None):
        read_tracker_config(args.log_tracker_config)  # a bad file stops the run now, not after model loading
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=tracker_dir, logging_dir=tracker_dir) if tracker_dir else None,
    )
    dropped = [t for t in log_with or [] if t not in {str(k) for k in accelerator.log_with}]
    if dropped:  # accelerate skips trackers it finds no package for, without an error
        raise UserError(f"--log_with {args.log_with}: accelerate cannot use {', '.join(dropped)} in this environment.",
                        fix=f"pip install {' '.join(dropped)} (then start a new run), or use --log_with tensorboard.")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    return accelerator, weight_dtype


def tracker_types(args) -> list[str]:
    """kohya's --log_with: tensorboard (the default when logging), wandb, or all (both)."""
    log_with = getattr(args, "log_with", None)
    return ["tensorboard", "wandb"] if log_with == "all" else [log_with or "tensorboard"]


def run_log_dir(logging_dir, args) -> str:
    """kohya's folder of one run's logs: <logging_dir>/<log_prefix><YYYYmmddHHMMSS>."""
    prefix = getattr(args, "log_prefix", None) or ""
    return str(Path(logging_dir) / (prefix + time.strftime("%Y%m%d%H%M%S")))


def prepare_wandb(args, log_dir: str | None) -> None:
    """wandb must be installed (it is optional); it runs offline unless WANDB_MODE says otherwise."""
    from accelerate.utils import is_wandb_available

    if not is_wandb_available():
        raise UserError(f"--log_with {args.log_with} needs wandb, which is not installed.",
                        fix="pip install wandb (into this environment), or use --log_with tensorboard.")
    if os.environ.get("WANDB_MODE") is None:
        os.environ["WANDB_MODE"] = "offline"
        where = f" under {log_dir}" if log_dir else ""
        print(f"note: wandb runs offline (WANDB_MODE=offline): its files are written{where} and can be uploaded "
              "later with `wandb sync`; set WANDB_MODE=online to log live.", flush=True)
    if log_dir and os.environ.get("WANDB_DIR") is None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(log_dir)  # kohya: wandb's files go with the run's other logs
    if getattr(args, "wandb_api_key", None):
        # Used by wandb when online; no login call here, which would need the network.
        os.environ["WANDB_API_KEY"] = args.wandb_api_key


SECRET_ARGS = ("wandb_api_key", "huggingface_token")


def loggable_config(args) -> dict:
    """The arguments as tracker hyperparameters (--log_config): plain values only, secrets left out."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in SECRET_ARGS or value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def read_tracker_config(path) -> dict:
    """kohya's --log_tracker_config: a TOML of tracker init arguments, {tracker name: {arg: value}}."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UserError("the --log_tracker_config file does not exist.", path=path,
                        fix="pass a TOML file such as: [wandb] followed by entity = \"me\", tags = [\"lora\"].")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"the --log_tracker_config {path} is not valid TOML ({err}).", path=path,
                        fix="fix the TOML at that line.") from None
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise UserError(f"'{bad[0]}' in {path} is not a table: the file holds one table per tracker.", path=path,
                        fix="write the arguments under [wandb] or [tensorboard].")
    return data


def init_trackers(accelerator, args, default_name: str) -> None:
    """Start the trackers as kohya does: named --log_tracker_name (else `default_name`), with
    --wandb_run_name, --log_tracker_config's arguments and, with --log_config, the arguments."""
    init_kwargs: dict = {}
    if getattr(args, "wandb_run_name", None):
        init_kwargs["wandb"] = {"name": args.wandb_run_name}
    if getattr(args, "log_tracker_config", None):
        for tracker, kwargs in read_tracker_config(args.log_tracker_config).items():
            init_kwargs[tracker] = {**init_kwargs.get(tracker, {}), **kwargs}
    config = loggable_config(args) if getattr(args, "log_config", False) else None
    accelerator.init_trackers(getattr(args, "log_tracker_name", None) or default_name, config=config,
                              init_kwargs=init_kwargs)

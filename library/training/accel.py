"""The accelerate `Accelerator` for a run, the dtype the frozen base weights use, the trackers
(kohya's --log_with, --log_prefix, --log_tracker_name, --log_tracker_config, --log_config, wandb flags),
and the few collective operations the training loop needs with several processes.

Layout as in kohya: TensorBoard writes to <logging_dir>/<log_prefix><time>/<tracker name>/; wandb
uses the tracker name as its project. wandb runs offline (WANDB_MODE=offline) unless the user set
WANDB_MODE, so a run never needs the network; `wandb sync` uploads it later.

Several processes (`accelerate launch --num_processes N`, torchrun): the loop averages the trainable
gradients itself (`average_gradients`) instead of relying on a DDP wrapper, because a LoRA's
modules run inside the U-Net's forward and never through a wrapper's. The scheduler is stepped once
per optimizer step whatever the number of processes (`split_batches`), so schedules count
optimizer steps. DeepSpeed and FSDP (from an accelerate config file) do their own gradient work.
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


# Lightning's --precision values -> ours
PRECISION_ALIASES = {"16-mixed": "fp16", "16": "fp16", "bf16-mixed": "bf16", "bf16": "bf16", "32": "no",
                     "32-true": "no"}


def apply_precision_alias(args) -> None:
    """--precision (Lightning's name) sets --mixed_precision; both given must agree."""
    precision = getattr(args, "precision", None)
    if not precision:
        return
    mixed = PRECISION_ALIASES[precision]
    if args.mixed_precision not in ("no", mixed):
        raise UserError(f"--precision {precision} means --mixed_precision {mixed}, but --mixed_precision "
                        f"{args.mixed_precision} is also given.", fix="pass only one of the two flags.")
    args.mixed_precision = mixed


def check_distributed_backend() -> None:
    """A DeepSpeed launch needs the deepspeed package, which is optional: say so in one paragraph
    instead of accelerate's ImportError."""
    import importlib.util

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes") \
            and importlib.util.find_spec("deepspeed") is None:
        raise UserError("the accelerate config asks for DeepSpeed, but the deepspeed package is not installed.",
                        fix="pip install deepspeed (on a machine with CUDA), or launch with a DDP config such as "
                            "configs/accelerate/ddp_2gpu.yaml.")


def make_accelerator(args, tracker_dir: str | None = None):
    """Build the Accelerator; returns (accelerator, weight_dtype for frozen weights)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    check_distributed_backend()
    apply_precision_alias(args)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed = resolve_mixed_precision(args.mixed_precision, device_type)
    if args.full_fp16 and mixed != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision=fp16 on a CUDA GPU.",
                        fix="drop --full_fp16, or use --full_bf16 with --mixed_precision=bf16.")
    if args.full_bf16 and mixed != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision=bf16.", fix="add --mixed_precision=bf16.")
    log_with = tracker_types(args) if tracker_dir else None
    if log_with and "wandb" in log_with:
        prepare_wandb(args, tracker_dir, create_dir=is_main_process())
    if log_with and getattr(args, "log_tracker_config", None):
        read_tracker_config(args.log_tracker_config)  # a bad file stops the run now, not after model loading
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # one scheduler step per optimizer step with any number of processes (see the module text)
        dataloader_config=DataLoaderConfiguration(split_batches=True),
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


def cpu_processes() -> bool:
    """Several processes launched on a machine without a GPU: accelerate then needs cpu=True to
    join them (over gloo); without it each process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def process_state():
    """accelerate's PartialState, made as make_accelerator's Accelerator makes it (usable before it)."""
    from accelerate import PartialState

    check_distributed_backend()  # before accelerate's own ImportError for a missing deepspeed
    return PartialState(cpu=cpu_processes())


def common_seed(seed: int | None) -> int:
    """The run's seed, the same on every process: `seed`, or one drawn on the main process."""
    import random

    state = process_state()
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    if state.num_processes > 1:
        import torch.distributed as dist

        value = torch.tensor([int(seed)], dtype=torch.int64, device=state.device)
        dist.broadcast(value, src=0)
        seed = int(value.item())
    return seed


def is_main_process() -> bool:
    """Whether this is the main process of the launch (true without a launcher); usable before
    the Accelerator exists, e.g. to create folders on one process only."""
    return process_state().is_main_process


def prepare_wandb(args, log_dir: str | None, create_dir: bool = True) -> None:
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
        if create_dir:
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


def init_trackers(accelerator, args, name: str) -> None:
    """Start the trackers as kohya does, named `name` (the trainer's run name, from
    --log_tracker_name where it applies), with --wandb_run_name, --log_tracker_config's arguments
    and, with --log_config, the arguments. Every trainer starts its trackers here
    (library.training.run.Run.start_trackers)."""
    init_kwargs: dict = {}
    if getattr(args, "wandb_run_name", None):
        init_kwargs["wandb"] = {"name": args.wandb_run_name}
    if getattr(args, "log_tracker_config", None):
        for tracker, kwargs in read_tracker_config(args.log_tracker_config).items():
            init_kwargs[tracker] = {**init_kwargs.get(tracker, {}), **kwargs}
    config = loggable_config(args) if getattr(args, "log_config", False) else None
    accelerator.init_trackers(name, config=config, init_kwargs=init_kwargs)


def reset_accelerate() -> None:
    """A fresh accelerate state for the next run in the same process (its settings may differ):
    the ControlNet stages, the in-process proofs and tests."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


# --- several processes -----------------------------------------------------------------------------

def _own_collectives(accelerator) -> bool:
    """True when the loop must average gradients itself: several processes without DeepSpeed/FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and accelerator.distributed_type not in (
        DistributedType.DEEPSPEED, DistributedType.FSDP)


_BUCKET_ELEMENTS = 1 << 24  # gradients are averaged in flat buckets of at most this many elements


def average_gradients(accelerator, params) -> None:
    """Average the gradients of `params` over the processes, as DDP would: a parameter that got a
    gradient on any process gets the average (zero where it had none); one that got none anywhere
    keeps none, as in a single process."""
    if not _own_collectives(accelerator):
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    dist.all_reduce(had, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, had.tolist()) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = accelerator.num_processes
    by_dtype: dict = {}
    for p in used:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        start = 0
        while start < len(group):
            bucket, size = [], 0
            while start < len(group) and (not bucket or size + group[start].numel() <= _BUCKET_ELEMENTS):
                bucket.append(group[start])
                size += group[start].numel()
                start += 1
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n


def broadcast_parameters(accelerator, module: torch.nn.Module) -> None:
    """Give every process the main process's weights (and buffers), as DDP does when it wraps."""
    if not _own_collectives(accelerator):
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a Ctrl+C seen by one of them)."""
    if accelerator.num_processes <= 1:
        return bool(flag)
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the processes (itself with one)."""
    if accelerator.num_processes <= 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values

"""Learning-rate schedules by kohya's `--lr_scheduler` names, or any class via `--lr_scheduler_type`.

The named schedules are transformers' (kohya uses the same functions; piecewise_constant is
diffusers'). `--lr_warmup_steps` and `--lr_decay_steps` are steps, or a ratio of the training
steps when below 1 (kohya floors ratio * steps).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from library.errors import UserError
from library.logs import warn_once

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")


def steps_from(value, total_steps: int) -> int:
    """A step count, or a ratio (< 1) of total_steps, floored as kohya does."""
    if not value:
        return 0
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def warmup_steps(args, max_train_steps: int, num_processes: int = 1) -> int:
    return steps_from(args.lr_warmup_steps, max_train_steps)


def uses_adafactor_schedule(optimizer) -> bool:
    """Adafactor with relative_step finds its own step size; only the `adafactor` schedule fits it."""
    from transformers.optimization import Adafactor

    return isinstance(optimizer, Adafactor) and bool(optimizer.defaults.get("relative_step"))


@lru_cache(maxsize=1)
def _adafactor_schedule_class():
    from transformers.optimization import AdafactorSchedule

    class ReportedAdafactorSchedule(AdafactorSchedule):
        """transformers' AdafactorSchedule, reporting plain floats: Adafactor's step size can be a
        0-d tensor, which loggers drop or sync on every use."""

        def get_lr(self):
            return [float(v) for v in super().get_lr()]

    return ReportedAdafactorSchedule


def build_scheduler(args, optimizer, max_train_steps: int, num_processes: int = 1):
    """The lr scheduler for the flags; step it once per optimizer step.

    Every count (total, warmup, decay, a custom scheduler's arguments) is in optimizer steps, with
    any number of processes: the Accelerator from make_accelerator steps a prepared scheduler once
    per optimizer step (split_batches). `num_processes` is accepted for older callers and unused.
    """
    from library.training.optim import parse_kwargs

    total = max_train_steps
    warm = warmup_steps(args, max_train_steps, num_processes)
    kwargs = parse_kwargs(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    custom = getattr(args, "lr_scheduler_type", "")
    if custom:
        return _custom_scheduler(custom, optimizer, kwargs)

    name = args.lr_scheduler
    if callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None)):
        # schedule-free optimizers keep their own schedule; kohya gives them a do-nothing scheduler
        if name != "constant" or warm:
            warn_once(f"{type(optimizer).__name__} keeps its own schedule: --lr_scheduler {name} and --lr_warmup_steps "
                      "are not used (as kohya); give warmup as --optimizer_args \"warmup_steps=N\".")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if uses_adafactor_schedule(optimizer):
        if name not in ("adafactor", "constant"):  # constant: the default, i.e. not a choice
            warn_once(f"Adafactor with relative_step=True sets its own learning rate; --lr_scheduler {name} is "
                      "replaced by the adafactor schedule (as in kohya).")
        name = "adafactor"
    if name == "adafactor":
        if not uses_adafactor_schedule(optimizer):
            raise UserError("--lr_scheduler adafactor only works with --optimizer_type Adafactor and its default "
                            "relative_step=True.",
                            fix="use --optimizer_type Adafactor, or another --lr_scheduler.")
        if warm:
            raise UserError("the adafactor schedule has no warmup (Adafactor with relative_step warms up by itself "
                            "with warmup_init=True).",
                            fix='drop --lr_warmup_steps, or add --optimizer_args "warmup_init=True".')
        return _adafactor_schedule_class()(optimizer, args.learning_rate)

    if name == "piecewise_constant":
        if "step_rules" not in kwargs:
            raise UserError("--lr_scheduler piecewise_constant needs its rules in --lr_scheduler_args.",
                            fix='add e.g. --lr_scheduler_args "step_rules=1:100,0.1:200,0.01" (multiplier:until '
                                'step, ..., final multiplier).')
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call(get_piecewise_constant_schedule, name, optimizer, **kwargs)

    from transformers import optimization as T

    if name == "constant":
        # kohya refuses warmup with `constant`; a warmup asked for is almost surely wanted.
        if not warm:
            return _call(T.get_constant_schedule, name, optimizer, **kwargs)
        name = "constant_with_warmup"
    if name == "constant_with_warmup":
        return _call(T.get_constant_schedule_with_warmup, name, optimizer, num_warmup_steps=warm, **kwargs)
    if name == "inverse_sqrt":
        return _call(T.get_inverse_sqrt_schedule, name, optimizer, num_warmup_steps=warm,
                     timescale=getattr(args, "lr_scheduler_timescale", None), **kwargs)
    common = dict(num_warmup_steps=warm, num_training_steps=total)
    if name == "linear":
        return _call(T.get_linear_schedule_with_warmup, name, optimizer, **common, **kwargs)
    if name == "cosine":
        return _call(T.get_cosine_schedule_with_warmup, name, optimizer, **common, **kwargs)
    if name == "cosine_with_restarts":
        return _call(T.get_cosine_with_hard_restarts_schedule_with_warmup, name, optimizer, **common,
                     num_cycles=args.lr_scheduler_num_cycles, **kwargs)
    if name == "polynomial":
        return _call(T.get_polynomial_decay_schedule_with_warmup, name, optimizer, **common,
                     power=args.lr_scheduler_power, **kwargs)
    min_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    if name == "cosine_with_min_lr":
        if min_ratio is None and "min_lr" not in kwargs:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio.",
                            fix="add e.g. --lr_scheduler_min_lr_ratio 0.1 (the final lr as a share of the start).")
        if min_ratio is not None:
            kwargs.setdefault("min_lr_rate", min_ratio)
        # kohya passes half the cycles: num_cycles=1 is one half-cosine from the top to the minimum
        return _call(T.get_cosine_with_min_lr_schedule_with_warmup, name, optimizer, **common,
                     num_cycles=args.lr_scheduler_num_cycles / 2, **kwargs)
    if name == "warmup_stable_decay":
        decay = steps_from(getattr(args, "lr_decay_steps", 0), total)
        if warm + decay > total:
            raise UserError(f"--lr_warmup_steps ({warm}) plus --lr_decay_steps ({decay}) exceed the {total} "
                            "training steps.", fix="lower one of them.")
        return _call(T.get_wsd_schedule, name, optimizer, num_warmup_steps=warm, num_stable_steps=total - warm - decay,
                     num_decay_steps=decay, num_cycles=args.lr_scheduler_num_cycles / 2,
                     min_lr_ratio=0.0 if min_ratio is None else min_ratio, **kwargs)
    raise UserError(f"unknown --lr_scheduler {name}.", fix=f"use one of: {', '.join(SCHEDULERS)}.")


def _call(fn, name, optimizer, **kwargs):
    try:
        return fn(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"--lr_scheduler {name} cannot be built with these arguments ({err}).",
                        fix="correct --lr_scheduler_args (or the other --lr_scheduler_* flags).") from None


def _custom_scheduler(name: str, optimizer, kwargs: dict):
    """kohya's --lr_scheduler_type: a torch.optim.lr_scheduler class name or module.Class, built as
    Class(optimizer, **lr_scheduler_args); --lr_scheduler and the warmup flags are not used."""
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot find the --lr_scheduler_type {name} ({err}).",
                        fix="use a class of torch.optim.lr_scheduler (e.g. CosineAnnealingLR) or module.ClassName "
                            "of an installed package.") from None
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"--lr_scheduler_type {name} cannot be built with --lr_scheduler_args {kwargs} ({err}).",
                        fix='pass the arguments the class needs, e.g. --lr_scheduler_args "T_max=100".') from None

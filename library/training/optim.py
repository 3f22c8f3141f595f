"""Optimizers by kohya's `--optimizer_type` names, with `--optimizer_args`.

Optional packages (bitsandbytes, lion-pytorch, prodigyopt, dadaptation) are imported only when
their optimizer is asked for; a missing one is a UserError naming the pip package.
`build_scheduler` lives in `library.training.schedulers` and is re-exported here.
"""
from __future__ import annotations

import ast
import importlib
import re

import torch

from library.errors import UserError
from library.logs import warn_once
from library.training.schedulers import build_scheduler, warmup_steps  # noqa: F401  (re-exported)

# kohya name (lowercase) -> (pip package, module, class)
_PACKAGED = {
    "lion": ("lion-pytorch", "lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
    "dadaptation": ("dadaptation", "dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation", "dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation", "dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "dadaptation", "DAdaptSGD"),
    "adafactor": ("transformers", "transformers.optimization", "Adafactor"),
    # schedule-free (kohya's names): they keep their own schedule; the loop switches train/eval modes
    "adamwschedulefree": ("schedulefree", "schedulefree", "AdamWScheduleFree"),
    "radamschedulefree": ("schedulefree", "schedulefree", "RAdamScheduleFree"),
    "sgdschedulefree": ("schedulefree", "schedulefree", "SGDScheduleFree"),
}
# bitsandbytes optimizers: 8-bit states (and paged memory) need its CUDA kernels.
_BITSANDBYTES = {
    "adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "pagedadamw": "PagedAdamW",
    "pagedadamw32bit": "PagedAdamW32bit", "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit",
    "sgdnesterov8bit": "SGD8bit",
}
_KEY = re.compile(r"\s+(?=[A-Za-z_][\w.]*=)")


def parse_kwargs(items, flag: str) -> dict:
    """kohya's key=value list: ["weight_decay=0.01", "betas=0.9,0.999"] -> {"weight_decay": 0.01,
    "betas": (0.9, 0.999)}. Values are Python literals (true/false in any case are booleans; text
    that is no literal stays a string). Several pairs may share one item ("a=1 b=2"), and a value may
    contain spaces ("betas=(0.9, 0.999)")."""
    out = {}
    for item in items or []:
        for part in _KEY.split(str(item).strip()):
            if not part:
                continue
            key, sep, raw = part.partition("=")
            if not sep or not key.strip():
                raise UserError(f"{flag} expects key=value items, got {part!r}.",
                                fix=f'write e.g. {flag} "weight_decay=0.01" "betas=0.9,0.999".')
            raw = raw.strip()
            if raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = raw
            out[key.strip()] = value
    return out


def optimizer_name(args) -> str:
    """The --optimizer_type in effect, with kohya's old --use_8bit_adam / --use_lion_optimizer."""
    chosen = args.optimizer_type or ""
    if getattr(args, "use_8bit_adam", False):
        if getattr(args, "use_lion_optimizer", False):
            raise UserError("--use_8bit_adam and --use_lion_optimizer exclude each other.", fix="pass one of them.")
        if chosen:
            raise UserError("--use_8bit_adam and --optimizer_type exclude each other.",
                            fix="use --optimizer_type AdamW8bit alone.")
        return "AdamW8bit"
    if getattr(args, "use_lion_optimizer", False):
        if chosen:
            raise UserError("--use_lion_optimizer and --optimizer_type exclude each other.",
                            fix="use --optimizer_type Lion alone.")
        return "Lion"
    return chosen or "AdamW"


def _import_class(package: str, module: str, cls: str, name: str):
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the optional package {package}, which is not installed.",
                        fix=f"pip install {package} (into this project's .venv), or use --optimizer_type AdamW.") from None


def _bitsandbytes_class(name: str, device_type: str):
    cls = _BITSANDBYTES[name.lower()]
    if device_type != "cuda":
        raise UserError(f"--optimizer_type {name} keeps 8-bit optimizer states with bitsandbytes' CUDA kernels; "
                        "this machine has no CUDA GPU.",
                        fix="use --optimizer_type AdamW (or Adafactor to save memory) here; on a CUDA machine "
                            "pip install bitsandbytes.")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the optional package bitsandbytes, which is not installed.",
                        fix="pip install bitsandbytes (into this project's .venv), or use --optimizer_type AdamW.") from None
    return getattr(bnb.optim, cls)


def _resolve_class(name: str, device_type: str):
    """(class, kohya's lowercase key or None for a free class name)."""
    lower = name.lower()
    if lower == "adamw":
        return torch.optim.AdamW, lower
    if lower == "sgdnesterov":
        return torch.optim.SGD, lower
    if lower in _BITSANDBYTES:
        return _bitsandbytes_class(name, device_type), lower
    if lower in _PACKAGED:
        return _import_class(*_PACKAGED[lower], name), lower
    # kohya: any class, "module.Class", or a bare name from torch.optim (Adam, RAdam, NAdam, ...)
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim
        return getattr(module, class_name), None
    except (ImportError, AttributeError) as err:
        raise UserError(f"unknown --optimizer_type {name} ({err}).",
                        fix="use AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, Prodigy, DAdaptAdam, "
                            "Adafactor, a torch.optim class name, or module.ClassName of an installed package.") from None


def _check_adaptive_lrs(name: str, param_groups, lr) -> None:
    """D-Adaptation and Prodigy estimate the step size d; their lr is a multiplier meant to be ~1
    (kohya warns at <= 0.1). They stop at the first step when param groups have different non-zero
    lrs (kohya only warns that the first one counts), so that is an error here, before training."""
    lrs = [lr]
    if isinstance(param_groups, list) and param_groups and isinstance(param_groups[0], dict):
        lrs = [g.get("lr", lr) for g in param_groups]
    nonzero = sorted({v for v in lrs if v})
    if len(nonzero) > 1:
        raise UserError(f"{name} takes one learning rate for all parts, got {', '.join(map(str, nonzero))} "
                        "(from --learning_rate, --unet_lr, --text_encoder_lr).",
                        fix="give the parts the same learning rate (around 1.0), or 0 to freeze one.")
    if nonzero and nonzero[0] <= 0.1:
        warn_once(f"the learning rate {nonzero[0]} is low for {name}, which adapts its own step size: "
                  "use --learning_rate 1.0 (and --unet_lr/--text_encoder_lr 1.0 if set).")


def fast_adamw_kwargs(device_type: str) -> dict:
    """torch.optim.AdamW's fastest implementation on `device_type`. One fused kernel over all tensors:
    measured on one CPU thread 3.4x faster than foreach on 384 LoRA tensors and 4.3x on large ones (a
    ControlNet's); also the fastest on CUDA. Elsewhere foreach, which every device has."""
    return {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}


def build_optimizer(args, param_groups, device_type: str):
    """Return (optimizer, description) for --optimizer_type with --optimizer_args.

    The description is kohya's ss_optimizer value: "module.Class(key=value,...)" listing the
    user's arguments and the defaults kohya adds to them (momentum, relative_step), not
    nesterov=True or our speed-only foreach/fused.
    """
    name = optimizer_name(args)
    kwargs = parse_kwargs(args.optimizer_args, "--optimizer_args")
    cls, key = _resolve_class(name, device_type)
    lr = args.learning_rate
    hidden = {}  # arguments kohya does not list in ss_optimizer (nesterov) or that only change speed

    if key == "adamw":
        if "fused" not in kwargs and "foreach" not in kwargs:
            hidden = fast_adamw_kwargs(device_type)
    elif key == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)  # Nesterov needs momentum; kohya's default
        hidden = {"nesterov": True}
    elif key == "sgdnesterov8bit":
        kwargs.setdefault("momentum", 0.9)
        hidden = {"nesterov": True}
    elif key is not None and (key.startswith("dadapt") or key == "prodigy"):
        _check_adaptive_lrs(name, param_groups, lr)
    elif key == "adafactor":
        lr, param_groups = _adafactor_setup(args, kwargs, param_groups, lr)

    try:
        optimizer = cls(param_groups, lr=lr, **kwargs, **hidden)
    except (TypeError, ValueError) as err:
        raise UserError(f"--optimizer_args do not fit {cls.__name__}: {err}.",
                        fix="remove or correct the arguments the optimizer does not take.") from None
    if callable(getattr(optimizer, "train", None)):  # schedule-free: train mode for the steps (kohya)
        optimizer.train()
    desc = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        desc += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return optimizer, desc


def _adafactor_setup(args, kwargs: dict, param_groups, lr):
    """kohya's Adafactor rules: relative_step defaults to True (and is forced by warmup_init); then
    Adafactor finds its own step size, so no lr is passed and per-group lrs are dropped, and
    build_scheduler uses the `adafactor` schedule, which only reports that step size."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        warn_once("Adafactor: warmup_init=True needs relative_step=True; relative_step is turned on.")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if isinstance(param_groups, list) and param_groups and isinstance(param_groups[0], dict):
            dropped = [g.pop("lr", None) for g in param_groups]
            if len(set(dropped)) > 1:
                warn_once("Adafactor with relative_step=True ignores --unet_lr and --text_encoder_lr.")
        return None, param_groups
    if args.max_grad_norm:
        warn_once("Adafactor with relative_step=False: gradient clipping (--max_grad_norm) is on; kohya "
                  "suggests --max_grad_norm 0.")
    if args.lr_scheduler != "constant_with_warmup":
        warn_once("Adafactor with relative_step=False: kohya suggests --lr_scheduler constant_with_warmup.")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        warn_once("Adafactor: clip_threshold=1.0 is recommended.")
    return lr, param_groups


def adaptive_lr_logs(optimizer, lr_names) -> dict:
    """kohya's extra TensorBoard scalars for D-Adaptation / Prodigy: lr/d*lr/<group> = d * lr, the
    step size they actually take (their lr is a multiplier around 1)."""
    out = {}
    for name, group in zip(lr_names, optimizer.param_groups):
        if "d" in group and group.get("lr") is not None:
            out[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
    return out

"""Optimizers and learning-rate schedules by kohya's names."""
from __future__ import annotations

import importlib
import math

import torch

from library.args import parse_kv_list
from library.errors import UserError


def optimizer_name(args) -> str:
    if args.use_8bit_adam:
        return "AdamW8bit"
    return args.optimizer_type or "AdamW"


def build_optimizer(args, param_groups, device_type: str):
    """Return (optimizer, description) for --optimizer_type with --optimizer_args."""
    name = optimizer_name(args)
    kwargs = parse_kv_list(args.optimizer_args, "--optimizer_args")
    lower = name.lower()
    if lower == "adamw":
        # foreach batches the many small LoRA tensors into few kernels; fused needs CUDA.
        if device_type == "cuda":
            kwargs.setdefault("fused", True)
        else:
            kwargs.setdefault("foreach", True)
        cls = torch.optim.AdamW
    elif lower == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
        cls = torch.optim.SGD
    elif lower in ("adamw8bit", "pagedadamw8bit", "lion8bit", "pagedlion8bit"):
        cls = _bitsandbytes_class(name, device_type)
    elif "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot import the optimizer class {name} ({err}).",
                            fix="install the package that provides it, or correct --optimizer_type.") from None
    else:
        raise UserError(f"unknown --optimizer_type {name}.",
                        fix="use AdamW, SGDNesterov, AdamW8bit or a module.ClassName.")
    lr = args.learning_rate
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except TypeError as err:
        raise UserError(f"--optimizer_args do not fit {name}: {err}.",
                        fix="remove or rename the arguments the optimizer does not take.") from None
    desc = f"{cls.__module__}.{cls.__name__}" + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    return optimizer, desc


def _bitsandbytes_class(name: str, device_type: str):
    if device_type != "cuda":
        raise UserError(f"--optimizer_type {name} needs a CUDA GPU and bitsandbytes; none was found.",
                        fix="use --optimizer_type AdamW on this machine.")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the bitsandbytes package.",
                        fix="pip install bitsandbytes, or use --optimizer_type AdamW.") from None
    return {"adamw8bit": bnb.optim.AdamW8bit, "pagedadamw8bit": bnb.optim.PagedAdamW8bit,
            "lion8bit": bnb.optim.Lion8bit, "pagedlion8bit": bnb.optim.PagedLion8bit}[name.lower()]


def warmup_steps(args, max_train_steps: int) -> int:
    w = args.lr_warmup_steps or 0
    return int(math.ceil(w * max_train_steps)) if 0 < w < 1 else int(w)


def build_scheduler(args, optimizer, max_train_steps: int):
    from diffusers.optimization import get_scheduler

    name = args.lr_scheduler
    warm = warmup_steps(args, max_train_steps)
    if name == "constant" and warm:
        name = "constant_with_warmup"
    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = args.lr_scheduler_num_cycles
    if name == "polynomial":
        kwargs["power"] = args.lr_scheduler_power
    return get_scheduler(name, optimizer, num_warmup_steps=warm, num_training_steps=max_train_steps, **kwargs)

"""Reading weight files safely, with a UserError for every way a file can be unusable.

`.safetensors` is memory-mapped by safetensors. Pickle-based files (`.ckpt`, `.pt`, `.pth`,
`.bin`) go only through `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers; an unrestricted unpickle would run whatever code the file carries.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from library.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

_REDOWNLOAD = "download or copy the file again (compare its size with the source), or pick another file."


def check_exists(path, what: str, flag: str = "the model path") -> Path:
    """The path as a Path, or a UserError saying what to pass instead."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        # "owner/name" is how hub models are named; say plainly that we never download.
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None
        hint = " (It looks like a Hugging Face hub id.)" if hub_id else ""
        raise UserError(
            f"{what} not found: {path} does not exist.{hint}", path=path,
            fix=f"pass a local file or folder as {flag}: a .safetensors/.ckpt checkpoint or a diffusers "
                "folder (with model_index.json, unet/, vae/, text_encoder/). Hub model ids are not "
                "downloaded; download the model first and pass its local path.")
    return path


def read_safetensors_metadata(path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def load_state_dict(path, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """The tensors of a weight file by key, on the CPU, leaving out keys starting with `skip_prefixes`.

    Skipped tensors of a .safetensors file are never read (an EMA copy of the UNet is 3.4 GB).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"the weight file {path} is empty (0 bytes).", path=path, fix=_REDOWNLOAD)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path, skip_prefixes)
    if suffix in PICKLE_SUFFIXES:  # memory-mapped where possible, so skipping costs nothing either
        sd = _load_pickle(path)
        return {k: v for k, v in sd.items() if not k.startswith(skip_prefixes)} if skip_prefixes else sd
    raise UserError(
        f"{path} has an unknown weight file type '{path.suffix}'.", path=path,
        fix="pass a .safetensors file (preferred), a .ckpt/.pt/.bin file, or a diffusers folder.")


def _unreadable(path, err) -> UserError:
    return UserError(
        f"the weight file {path} cannot be read: it is truncated or not a valid file of its type "
        f"({err}).", path=path, fix=_REDOWNLOAD)


def _load_safetensors(path: Path, skip_prefixes: tuple[str, ...]) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys() if not key.startswith(skip_prefixes)}
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def _refusal(err) -> str:
    """torch's reason for refusing, e.g. "unsupported GLOBAL posix.system" (its other lines only
    suggest turning the safety off)."""
    for line in str(err).splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith(("Please file", "Check the documentation")):
            return f" ({line.rstrip('.')})"
    return ""


def _load_pickle(path: Path) -> dict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower() and "weights_only" not in str(err):
            raise _unreadable(path, err) from None
        raise UserError(
            f"refusing to load {path}: it is a pickle that holds more than tensors{_refusal(err)}, "
            "and unpickling it fully could run code stored in the file.", path=path,
            fix="use a .safetensors version of this model, or, only if you trust its source, convert "
                "it to .safetensors with another tool and pass that file.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        items = obj.items() if isinstance(obj, dict) else ()
        tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
        if not tensors:
            raise UserError(f"{path} holds no tensors by name; it is not a model checkpoint.", path=path,
                            fix="pass a Stable Diffusion checkpoint (.safetensors or .ckpt).")
        obj = tensors
    return obj

"""Model families: what differs between SD1.x, SD2.x (and next SDXL), one module per family behind
one small interface (`ModelFamily`, base.py), chosen from the weights by the registry here.

    family = detect_state_dict(state_dict, path)   # single-file checkpoint: from its keys
    family = detect_folder(folder)                  # diffusers folder: from its configs
    family = get("sd2")                             # by name (metadata, tools)
    cond = family.encode_prompts(model, captions, device=..., clip_skip=..., max_token_length=...)
    pred = unet(noisy, timesteps, **cond.unet_kwargs(dtype)).sample

Adding a family is one module (a ModelFamily subclass) and one `register(...)` call; the
contract is written in base.py and in docs/model_families.md. Modules: base (the interface,
TextConditioning, the shared CLIP text path), sd1, sd2.
"""
from __future__ import annotations

from pathlib import Path

from library.errors import UserError
from library.models.families.base import ModelFamily, TextConditioning

_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add a family; detection asks the registered families in order, and exactly one may match."""
    if family.name in _REGISTRY:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def families() -> list[ModelFamily]:
    return list(_REGISTRY.values())


def get(name: str) -> ModelFamily:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(_REGISTRY)}.",
                        fix=f"use one of {', '.join(_REGISTRY)}.") from None


def for_v2(v2: bool) -> ModelFamily:
    """SD2.x or SD1.x, as kohya's --v2 / ss_v2 name them."""
    return get("sd2" if v2 else "sd1")


def _one(matches: list[ModelFamily], what: str) -> ModelFamily | None:
    if len(matches) > 1:  # a registration bug, not bad input: two families claim the same weights
        raise RuntimeError(f"{what} matches several model families: {', '.join(f.name for f in matches)}")
    return matches[0] if matches else None


def detect_state_dict(state_dict, path=None) -> ModelFamily:
    """The family of a single-file checkpoint, from its keys (and shapes); a clear UserError naming
    the file when no registered family recognises it."""
    found = _one([f for f in _REGISTRY.values() if f.matches_state_dict(state_dict)], f"the checkpoint {path}")
    if found is None:
        raise unknown_checkpoint(path, state_dict)
    return found


def detect_folder(folder) -> ModelFamily:
    """The family of a diffusers folder, from its unet/config.json (and text encoder configs)."""
    folder = Path(folder)
    found = _one([f for f in _REGISTRY.values() if f.matches_folder(folder)], f"the folder {folder}")
    if found is None:
        raise UserError(f"cannot tell which model family the diffusers folder {folder} is "
                        f"(known: {', '.join(f.title for f in _REGISTRY.values())}).", path=folder,
                        fix="pass a diffusers folder of one of these families (with unet/config.json).")
    return found


SUPPORTED = "this tool trains Stable Diffusion 1.x and 2.x models (SD1.5, SD2.1 and fine-tunes of them)"


def unknown_checkpoint(path, state_dict) -> UserError:
    """What a checkpoint of no registered family is, said as precisely as its keys allow."""
    keys = list(state_dict)
    sample = f" Its first keys: {', '.join(keys[:3])}." if keys else ""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        reason, sample = "it is a LoRA file, not a base model", ""
    elif any(k.startswith("conditioner.embedders.") for k in keys):
        reason, sample = f"it is an SDXL checkpoint (conditioner.embedders.* keys); {SUPPORTED}", ""
    elif not any(k.startswith("model.diffusion_model.") for k in keys):
        reason = ("it has no model.diffusion_model.* (UNet) keys, so it is not a Stable Diffusion checkpoint "
                  "in the original single-file layout")
    else:
        reason = ("its keys match none of the model families this tool knows "
                  f"({', '.join(f.title for f in _REGISTRY.values())})")
    return UserError(f"cannot use {path} as a Stable Diffusion 1.x/2.x model: {reason}.{sample}", path=path,
                     fix="pass an SD1.x/SD2.x base checkpoint (.safetensors) or a diffusers folder of one.")


from library.models.families import sd1, sd2  # noqa: E402  (each module registers its family)

__all__ = ["ModelFamily", "TextConditioning", "detect_folder", "detect_state_dict", "families", "for_v2", "get",
           "register", "sd1", "sd2", "unknown_checkpoint"]

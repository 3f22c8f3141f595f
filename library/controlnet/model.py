"""The ControlNet: built from the base UNet, loaded from a diffusers folder or a single file, saved as both.

A single file may also be a torch .pth/.ckpt state dict (e.g. `torch.save(controlnet.state_dict())`
or a Lightning checkpoint's "state_dict"), with diffusers or original key names.

Single file = the original ControlNet layout (lllyasviel's cldm; what kohya writes), which WebUI's
ControlNet extension, ComfyUI's "Load ControlNet Model" and diffusers' `from_single_file` read:
`input_blocks.*`/`middle_block.*`/`time_embed.*` (the UNet encoder's LDM names), `input_hint_block.*`
(the conditioning embedding: convs at even indices 0..14, SiLU between), `zero_convs.N.0.*` and
`middle_block_out.0.*`. Keys carry no `control_model.` prefix (those loaders accept both).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import atomic_dir, save_safetensors_atomic, write_json_atomic

SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # SD's x8 VAE: three stride-2 stages
RECORD_NAME = "training_config.json"        # our settings beside the weights (inference reads sigma here)


def embedding_channels_for(vae) -> tuple[int, ...]:
    """Conditioning-embedding widths: one stride-2 stage per VAE downsampling (x8 -> SD's four)."""
    stages = len(vae.config.block_out_channels) - 1
    return SD_EMBEDDING_CHANNELS[:stages + 1]


def create_controlnet(unet, vae, conditioning_channels: int = 3):
    """A ControlNet initialised from the base UNet's encoder (zero convs at zero: starts as a no-op)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels_for(vae),
                                     conditioning_channels=conditioning_channels)


def resolve_controlnet_path(path) -> Path:
    """Accept the ControlNet folder, a training output folder holding controlnet/ (or final/controlnet/),
    or a single .safetensors file."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path, path / "controlnet", path / "final" / "controlnet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError("no ControlNet found there (neither a diffusers folder with config.json nor a .safetensors file).",
                    path=path, fix="pass the controlnet/ folder a training run wrote, or its .safetensors file.")


def load_controlnet(path, unet=None, vae=None, dtype=torch.float32):
    """Load a ControlNet folder or single file; a single file needs the base unet and vae for its shape."""
    path = resolve_controlnet_path(path)
    if path.is_dir():
        from diffusers import ControlNetModel

        try:
            return ControlNetModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot load the ControlNet in {path} ({str(err).splitlines()[0]}).", path=path,
                            fix="pass a folder written by train_controlnet.py (config.json + weights).") from None
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    if unet is None or vae is None:
        raise UserError("a single-file ControlNet needs the base model to know its shape.",
                        fix="pass --pretrained_model_name_or_path too.")
    controlnet = create_controlnet(unet, vae)
    state = load_file(str(path)) if path.suffix == ".safetensors" else _torch_state(path)
    if DIFFUSERS_MARKER not in state:  # the original layout (ours, WebUI's, kohya's)
        state = convert_controlnet_checkpoint(state, dict(controlnet.config))
    problem = None
    if any(v is None for v in state.values()):
        problem = "it lacks weights the base model's shape needs"
    else:
        try:
            missing, unexpected = controlnet.load_state_dict(state, strict=False)
            if missing or unexpected:
                problem = f"{len(missing)} missing, {len(unexpected)} unexpected weights"
        except RuntimeError as err:  # shape mismatches
            problem = str(err).strip().splitlines()[-1].strip()
    if problem:
        raise UserError(f"the ControlNet file {path} does not fit the base model ({problem}).", path=path,
                        fix="use the base model the ControlNet was trained on.")
    return controlnet.to(dtype)


DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"


def _torch_state(path: Path) -> dict:
    """A state dict from a .pth/.bin/.ckpt: plain, or under "state_dict" (Lightning), with or without
    a "controlnet." / "model." prefix; diffusers or original key names (load_controlnet tells them apart)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor objects
        raise UserError(f"cannot read the ControlNet file {path} ({str(err).splitlines()[0][:200]}).", path=path,
                        fix="pass the controlnet/ folder, a .safetensors file, or a .pth holding a state dict.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"the ControlNet file {path} holds no state dict of tensors.", path=path,
                        fix="save the ControlNet's weights with torch.save(controlnet.state_dict(), path).")
    if DIFFUSERS_MARKER not in state:
        for prefix in ("controlnet.", "model.controlnet.", "model."):
            if prefix + DIFFUSERS_MARKER in state:
                return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_record(path) -> dict:
    """The training settings saved with a ControlNet (conditioning type, heatmap sigma, ...), or {}."""
    path = Path(path)
    if path.is_file():
        from safetensors import safe_open

        if path.suffix != ".safetensors":
            return {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("sdt_training_config", "{}"))
    record = path / RECORD_NAME
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}


def save_controlnet(controlnet, folder, record: dict, dtype: torch.dtype | None = None) -> Path:
    """The diffusers folder (config.json + diffusion_pytorch_model.safetensors + our record), atomically."""
    model = controlnet
    if dtype is not None and next(controlnet.parameters()).dtype != dtype:
        model = copy.deepcopy(controlnet).to(dtype)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / RECORD_NAME, record)
    return Path(folder)


def controlnet_to_ldm(state: dict) -> dict:
    """diffusers ControlNetModel keys -> the original single-file layout (see the module doc)."""
    from library.models.arch import UNET_PREFIX
    from library.models.convert import unet_to_ldm

    encoder = {k: v for k, v in state.items() if not k.startswith("controlnet_")}
    out = {k[len(UNET_PREFIX):]: v for k, v in unet_to_ldm(encoder).items()}
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")}
    if len(blocks) != 6:
        raise ValueError(f"the conditioning embedding has {len(blocks)} inner convs; the single-file layout "
                         "has 6 (SD's x8 VAE)")
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("controlnet_cond_embedding.conv_in."):
            out[f"input_hint_block.0.{parts[-1]}"] = value
        elif key.startswith("controlnet_cond_embedding.blocks."):
            out[f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[-1]}"] = value
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            out[f"input_hint_block.14.{parts[-1]}"] = value
        elif key.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{parts[1]}.0.{parts[-1]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{parts[-1]}"] = value
    return out


def save_controlnet_single_file(controlnet, path, record: dict, dtype: torch.dtype | None = None) -> Path | None:
    """The single-file copy; None (with a warning) when the shape has no single-file layout."""
    from library.logs import warn_once

    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in controlnet.state_dict().items()}
    try:
        ldm = controlnet_to_ldm(state)
    except ValueError as err:
        warn_once(f"no single-file ControlNet written ({err}); the diffusers folder holds the weights.")
        return None
    meta = {"format": "pt", "modelspec.architecture": "stable-diffusion-v1/controlnet",
            "sdt_training_config": json.dumps(record)}
    save_safetensors_atomic(ldm, path, metadata=meta)
    return Path(path)

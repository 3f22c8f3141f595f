"""The kohya LoRA file contract: module names, which layers are targets, file reading, hashes.

See docs/lora_format.md. Everything here is pure naming/serialization; the
trainable modules live in `networks/lora.py`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"

# kohya's defaults: attention/MLP Linear layers and the 1x1 proj_in/proj_out convs.
UNET_TARGETS = ("Transformer2DModel",)
# LoCon (`conv_dim`): also the ResNet blocks and the down/upsamplers.
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers 4 had per-backend attention subclasses; transformers 5 only CLIPAttention.
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

TENSOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# transformers 5's CLIPTextModel dropped the `text_model` level; files keep the 4.x spelling
# because WebUI, ComfyUI and sd-scripts only match that one.
_TE_SHORT = TE_PREFIX + "_encoder_"
_TE_LONG = TE_PREFIX + "_text_model_encoder_"


def lora_name(prefix: str, module_path: str) -> str:
    """`lora_unet_<path>` / `lora_te_text_model_<path>` with dots turned into underscores."""
    if prefix == TE_PREFIX and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path}".replace(".", "_")


def canonical_key(key: str) -> str:
    """Map the transformers-5 TE spelling (`lora_te_encoder_...`) onto the contract's."""
    if key.startswith(_TE_SHORT):
        return _TE_LONG + key[len(_TE_SHORT):]
    return key


def iter_targets(root: torch.nn.Module, class_names) -> Iterator[tuple[str, torch.nn.Module]]:
    """Yield (path, layer) for each Linear/Conv2d inside a module whose class is in `class_names`."""
    seen = set()
    for path, module in root.named_modules():
        if type(module).__name__ not in class_names:
            continue
        for child_path, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if isinstance(child, torch.nn.Conv2d) and child.groups != 1:
                continue  # grouped convs cannot be expressed as up @ down
            full = f"{path}.{child_path}" if path else child_path
            if full not in seen:
                seen.add(full)
                yield full, child


def is_1x1(layer: torch.nn.Module) -> bool:
    return isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)


ADAPTER_KEY_PARTS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_", "lokr_", "oft_", "dora_scale")


def not_a_lora_reason(sd: dict) -> str | None:
    """Why `sd` is no LoRA (or LyCORIS) file, e.g. a full U-Net or checkpoint; None when it is one."""
    if any(part in key for key in sd for part in ADAPTER_KEY_PARTS):
        return None
    if not sd:
        return "it holds no tensors"
    example = next(iter(sorted(sd)))
    full = any(k.startswith(("model.diffusion_model.", "down_blocks.", "conv_in.", "first_stage_model.",
                             "cond_stage_model.", "text_model.", "encoder.", "decoder.")) for k in sd)
    kind = "a full model (U-Net, VAE, text encoder or checkpoint)" if full else "not a LoRA"
    return f"it is {kind}: none of its {len(sd)} tensors is a LoRA weight (e.g. {example})"


def check_is_lora(sd: dict, path, flag: str = "--network_weights (or --base_weights)") -> None:
    """Raise a UserError when `sd` is no LoRA file (not_a_lora_reason) or holds NaN/Inf weights."""
    from library.errors import UserError
    from library.fileio import nonfinite_tensors

    reason = not_a_lora_reason(sd)
    if reason:
        raise UserError(f"{path} is not a LoRA file: {reason}.", path=path,
                        fix=f"pass {flag} a LoRA file (its tensors are named lora_unet_*/lora_te_* with "
                            "lora_down/lora_up); a base model goes to --pretrained_model_name_or_path.")
    bad = nonfinite_tensors(sd)
    if bad:
        raise UserError(f"the LoRA file {path} holds NaN or Inf weights ({len(bad)} tensors, e.g. {bad[0]}); it "
                        "was saved from a diverged training.", path=path,
                        fix=f"pass {flag} a file saved before the divergence.")


def read_weights(path) -> dict[str, torch.Tensor]:
    """Load a LoRA file (.safetensors, or a torch pickle of tensors) with contract key names."""
    from library.errors import UserError

    if not os.path.isfile(path):
        raise UserError("the LoRA weights file does not exist.", path=path,
                        fix="check the path given to --network_weights (or the script's LoRA option).")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated file: tell the user which one
        raise UserError(f"cannot read the LoRA weights file ({err}).", path=path,
                        fix="re-download or re-save the file; it may be truncated.") from None
    check_is_lora(sd, path)
    return {canonical_key(k): v for k, v in sd.items()}


def ranks_and_alphas(weights_sd: dict) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (from lora_down's first dim) and alpha (missing alpha -> rank, as kohya)."""
    dims, alphas = {}, {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        name = key.split(".", 1)[0]
        if key.endswith(".alpha"):
            alphas[name] = float(value)
        elif key.endswith(".lora_down.weight"):
            dims[name] = int(value.shape[0])
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}


def unify_linear_alphas(sd: dict) -> tuple[dict, int]:
    """Give every Linear / 1x1-conv module the same alpha without changing its update.

    diffusers builds one PEFT config per component and drops per-module alphas of attention and
    text-encoder layers, so a file whose Linear alphas differ loads with wrong scales there. The
    update `alpha/r * up @ down` is kept exact by scaling `up` by alpha/common. 3x3 conv modules
    keep their own alpha (diffusers handles those). Returns (new dict, number of modules changed).
    """
    from collections import Counter

    linear = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight") and (down.dim() == 2 or tuple(down.shape[2:]) == (1, 1)):
            name = key[: -len(".lora_down.weight")]
            if name + ".alpha" in sd:
                linear[name] = float(sd[name + ".alpha"])
    if len(set(linear.values())) <= 1:
        return sd, 0
    common = max(Counter(linear.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    out = dict(sd)
    changed = 0
    for name, alpha in linear.items():
        if alpha != common:
            up = sd[name + ".lora_up.weight"]
            out[name + ".lora_up.weight"] = (up.float() * (alpha / common)).to(up.dtype)
            out[name + ".alpha"] = torch.tensor(common, dtype=sd[name + ".alpha"].dtype)
            changed += 1
    return out, changed


def serialize_with_hashes(tensors: dict, metadata: dict | None) -> bytes:
    """Safetensors bytes with `sshs_model_hash` / `sshs_legacy_hash` matching those very bytes.

    model hash: sha256 of everything after the header (the tensor data), which does not depend on
    the metadata. legacy hash (sd-webui-additional-networks): the file re-serialized with only the
    `ss_*` metadata, sha256 of its bytes [1 MiB, 1 MiB + 64 KiB), first 8 hex digits.
    """
    from safetensors.torch import save

    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    probe = save(tensors, metadata=ss_only)
    data = memoryview(probe)[8 + int.from_bytes(probe[:8], "little"):]
    metadata["sshs_model_hash"] = hashlib.sha256(data).hexdigest()
    metadata["sshs_legacy_hash"] = hashlib.sha256(probe[0x100000:0x110000]).hexdigest()[:8]
    out = save(tensors, metadata=metadata)
    written = memoryview(out)[8 + int.from_bytes(out[:8], "little"):]
    if written != data:  # the hash is user-visible, so never let it go stale silently
        raise RuntimeError("safetensors wrote different tensor bytes for the same tensors")
    return out


def data_section_sha256(path) -> str:
    """sha256 of a safetensors file's bytes after its header (what WebUI shows as the hash)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        return hashlib.sha256(fh.read()).hexdigest()

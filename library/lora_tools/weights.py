"""LoRA files as per-module (down, up, alpha), for tools that compute with the weight deltas.

A module's delta is (alpha / rank) * up @ down, shaped like its layer's weight: Linear
[out, in]; Conv2d [out, in, kh, kw] with down carrying the kernel and up being [out, r, 1, 1].
Reading is strict: anything that is not plain LoRA/LoCon stops with the file and the module
named, because these tools would otherwise drop it without a word.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.logs import warn_once
from networks import lora_format as fmt


@dataclass
class ModuleWeights:
    name: str
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]),) + tuple(int(s) for s in self.down.shape[1:])

    @property
    def is_conv3x3(self) -> bool:
        """A LoCon conv (kernel > 1); these get --new_conv_rank / --conv_dim and their own alpha."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def factors(self, ratio: float = 1.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [out, r], B [r, in*kh*kw]) in fp32 with A @ B = ratio * delta (flattened)."""
        a = self.up.to(device, torch.float32).flatten(1) * (ratio * self.scale)
        return a, self.down.to(device, torch.float32).flatten(1)

    def delta(self, ratio: float = 1.0, device=None) -> torch.Tensor:
        a, b = self.factors(ratio, device)
        return (a @ b).reshape(self.weight_shape)


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def state_dict(self) -> dict[str, torch.Tensor]:
        return module_tensors(self.modules.values())


def _not_plain(path, example: str) -> UserError:
    return UserError(
        f"{path} holds tensors that are not plain LoRA/LoCon (e.g. '{example}'): it is a LyCORIS "
        "(LoHa/LoKr), DoRA or other adapter format, which these tools cannot compute with.", path=path,
        fix="pass a kohya LoRA/LoCon file (lora_down.weight / lora_up.weight / alpha per module).")


def read_lora(path) -> LoraFile:
    """Read a LoRA file (.safetensors, or .ckpt/.pt weights-only) into checked modules."""
    from library.models.checkpoint_io import check_exists, load_state_dict, read_safetensors_metadata

    path = check_exists(path, "LoRA file", flag="the LoRA file")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a LoRA file.", path=path,
                        fix="pass the .safetensors file of the LoRA.")
    sd = load_state_dict(path)
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in sd.items():
        name, _, suffix = fmt.canonical_key(key).partition(".")
        if "." + suffix not in fmt.TENSOR_SUFFIXES or not name.startswith(("lora_unet_", "lora_te")):
            raise _not_plain(path, key)
        parts[name][suffix] = value
    if not parts:
        raise UserError(f"{path} holds no LoRA modules.", path=path,
                        fix="pass a kohya LoRA file (lora_unet_* / lora_te_* tensors).")
    modules = {}
    for name, tensors in sorted(parts.items()):
        modules[name] = _module(path, name, tensors)
    dtypes = collections.Counter(m.up.dtype for m in modules.values())
    metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    return LoraFile(path=path, modules=modules, metadata=metadata, dtype=dtypes.most_common(1)[0][0])


def _module(path, name: str, tensors: dict) -> ModuleWeights:
    down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down.weight" if down is None else "lora_up.weight"
        raise UserError(f"the module {name} in {path} has no {missing} tensor.", path=path,
                        fix="the file is incomplete; save it again from its source.")
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] \
            or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise UserError(f"the module {name} in {path} has shapes that do not form a LoRA: down "
                        f"{list(down.shape)}, up {list(up.shape)} (the rank, down's first size, must "
                        "equal up's second).", path=path, fix="the file is damaged; save it again from its source.")
    for tensor in (down, up):
        if not torch.isfinite(tensor).all():
            raise UserError(f"the module {name} in {path} holds NaN or Inf values.", path=path,
                            fix="the LoRA is broken (often a training run that diverged); use an earlier file.")
    alpha = tensors.get("alpha")
    alpha = float(alpha) if alpha is not None and alpha.numel() == 1 else 0.0
    if not alpha or alpha != alpha:
        warn_once(f"{path}: some modules have a missing or zero alpha; using alpha = rank for them, as "
                  "sd-scripts does (other programs may read it differently).")
        alpha = float(down.shape[0])
    return ModuleWeights(name, down, up, alpha)


def common_alphas(modules) -> tuple[float | None, float | None]:
    """The most common alpha of Linear (and 1x1) modules and of 3x3 conv modules (None if none)."""
    linear = collections.Counter(m.alpha for m in modules if not m.is_conv3x3)
    conv = collections.Counter(m.alpha for m in modules if m.is_conv3x3)
    return (linear.most_common(1)[0][0] if linear else None, conv.most_common(1)[0][0] if conv else None)


def lora_metadata(modules, output_path, extra: dict | None = None) -> dict[str, str]:
    """The identifying ss_* keys of a LoRA file written by a tool (not by training)."""
    modules = list(modules)
    ranks = collections.Counter(m.rank for m in modules if not m.is_conv3x3)
    linear_alpha, conv_alpha = common_alphas(modules)
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else None),
            "ss_network_alpha": str(linear_alpha),
            "ss_base_model_version": "sd_v1", "ss_v2": "False",
            "ss_output_name": Path(output_path).stem}
    conv_ranks = collections.Counter(m.rank for m in modules if m.is_conv3x3)
    if conv_ranks:
        import json

        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_ranks.most_common(1)[0][0]),
                                              "conv_alpha": str(conv_alpha)})
    meta.update(extra or {})
    return meta


def modelspec_metadata(output_path, v2: bool = False, v_parameterization: bool = False,
                       merged_from: list | None = None, kind: str = "lora") -> dict[str, str]:
    """The sai ModelSpec keys kohya's tools write (sai_model_spec.build_metadata): title from the file
    name, architecture from v2 / v-prediction, merged_from for merges. --no_metadata leaves them out."""
    import time

    from library.training.metadata import modelspec_architecture

    meta = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{modelspec_architecture(v2, v_parameterization)}/{kind}",
            "modelspec.implementation": "diffusers", "modelspec.title": Path(output_path).stem,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.prediction_type": "v" if v_parameterization else "epsilon"}
    if merged_from:
        meta["modelspec.merged_from"] = ", ".join(Path(str(p)).stem for p in merged_from)
    return meta


def shuffle_ranks(modules, generator: torch.Generator | None = None) -> list:
    """kohya's merge_lora --shuffle: permute each module's rank dimension (down's rows with up's
    columns). up @ down, and so what the LoRA does, is unchanged; the tensors are not."""
    out = []
    for m in modules:
        perm = torch.randperm(m.rank, generator=generator)
        out.append(ModuleWeights(m.name, m.down[perm], m.up[:, perm], m.alpha))
    return out


def merge_sources(loras, ratios) -> list[dict]:
    """What a merge was made from (file, ratio, WebUI's hash of it), for the result's metadata."""
    return [{"file": lora.path.name, "ratio": ratio,
             "sshs_model_hash": fmt.data_section_sha256(lora.path) if lora.path.suffix == ".safetensors" else None}
            for lora, ratio in zip(loras, ratios)]


def module_tensors(modules, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors for these modules (on the CPU; alpha as a 0-d tensor of the same dtype)."""
    sd = {}
    for m in modules:
        sd[f"{m.name}.lora_down.weight"] = m.down.detach().to("cpu", dtype or m.down.dtype).contiguous()
        sd[f"{m.name}.lora_up.weight"] = m.up.detach().to("cpu", dtype or m.up.dtype).contiguous()
        sd[f"{m.name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype or m.down.dtype)
    return sd


def write_lora(path, modules, dtype: torch.dtype, metadata: dict | None = None) -> Path:
    """Write modules (contract names, alpha in the same dtype) atomically; .safetensors gets hashes."""
    from library.fileio import atomic_path, torch_save_atomic

    path = Path(path)
    sd = module_tensors(modules, dtype)
    if path.suffix.lower() == ".safetensors":
        data = fmt.serialize_with_hashes(sd, metadata)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        torch_save_atomic(sd, path)
    return path

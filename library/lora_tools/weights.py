"""LoRA files as per-module (down, up, alpha), for tools that compute with the weight deltas.

A module's delta is (alpha / rank) * up @ down, shaped like its layer's weight: Linear
[out, in]; Conv2d [out, in, kh, kw] with down carrying the kernel and up being [out, r, 1, 1].
LoHa and LoKr modules (networks/lycoris_format.py) are read as their exact delta in that form,
with an identity for one factor (rank min(out, in*kh*kw), alpha = rank), so every tool computes
with them as with a LoRA; `source` keeps their own tensors for merging and writing. A DoRA module
keeps its `dora_scale` (its change depends on the base weight, which only model merges have).
Reading is strict: tensors of no known algorithm stop with the file and the module named.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.logs import warn_once
from networks import lora_format as fmt
from networks import lycoris_format as lyc


@dataclass
class ModuleWeights:
    name: str
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    dora_scale: torch.Tensor | None = None
    algo: str = "lora"  # "loha" / "lokr": down/up hold the dense delta, `source` the file's tensors
    source: dict | None = None

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

    def lycoris_modules(self) -> list[str]:
        """Names of the modules that are not plain LoRA (LoHa, LoKr, or with a dora_scale)."""
        return [n for n, m in self.modules.items() if m.algo != "lora" or m.dora_scale is not None]


def _not_plain(path, example: str) -> UserError:
    return UserError(
        f"{path} holds tensors that are not of a kohya or LyCORIS adapter (e.g. '{example}').", path=path,
        fix="pass a LoRA/LoCon, LoHa, LoKr or DoRA file (lora_unet_* / lora_te_* modules).")


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
        if not name.startswith(("lora_unet_", "lora_te")):
            raise _not_plain(path, key)
        parts[name][suffix] = value
    if not parts:
        raise UserError(f"{path} holds no LoRA modules.", path=path,
                        fix="pass a kohya LoRA file (lora_unet_* / lora_te_* tensors).")
    modules = {}
    for name, tensors in sorted(parts.items()):
        algo = lyc.module_algo(name, tensors, path)  # unknown keys: an error naming the module
        if algo == "lora":
            modules[name] = _module(path, name, tensors)
            modules[name].dora_scale = tensors.get("dora_scale")
        else:
            modules[name] = _dense_module(path, name, algo, tensors)
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


def _dense_module(path, name: str, algo: str, tensors: dict) -> ModuleWeights:
    """A LoHa/LoKr module as its exact delta: up @ down with an identity on the smaller side."""
    from library.lora_tools.model_fit import sd15_layers

    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise UserError(f"the module {name} in {path} holds NaN or Inf values ({key}).", path=path,
                            fix="the adapter is broken (often a training run that diverged); use an earlier file.")
    shape = _lycoris_weight_shape(name, algo, tensors, sd15_layers())
    if shape is None:
        raise UserError(f"cannot tell the layer shape of the {algo} module {name} in {path}: it names no SD1.x "
                        "layer, and its tensors do not give the conv kernel.", path=path,
                        fix="use the file with the model it was trained on (merge_lora.py --sd_model, gen_img.py).")
    try:
        delta = lyc.product(algo, tensors, shape) * lyc.module_scale(algo, tensors)
    except RuntimeError as err:
        raise UserError(f"the {algo} module {name} in {path} has factors that do not form a {list(shape)} weight "
                        f"({str(err).splitlines()[0]}).", path=path,
                        fix="the file is damaged, or made for another model; save it again from its source.") from None
    flat = delta.reshape(shape[0], -1)
    if flat.shape[0] <= flat.shape[1]:  # rank = out: up = I, down = delta (carries the kernel)
        up = torch.eye(shape[0]).reshape(shape[0], shape[0], *([1, 1] if len(shape) == 4 else []))
        down = delta
    else:  # rank = in*kh*kw: up = delta, down = I (each row one input position of the kernel)
        n = flat.shape[1]
        up = flat.reshape(shape[0], n, *([1, 1] if len(shape) == 4 else []))
        down = torch.eye(n).reshape(n, *shape[1:])
    return ModuleWeights(name, down, up, float(down.shape[0]), tensors.get("dora_scale"), algo, dict(tensors))


def _lycoris_weight_shape(name, algo, tensors, layers):
    """The layer's weight shape: the kernel from SD1.x's layer of that name (or a 4-D lokr_w2)."""
    if algo == "loha":
        out, flat_in = tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]
    else:
        w1 = tensors.get("lokr_w1")
        l, m = (w1.shape if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]))
        w2 = tensors.get("lokr_w2")
        if w2 is not None and w2.dim() == 4:
            return (l * w2.shape[0], m * w2.shape[1], *w2.shape[2:])
        k, n = w2.shape if w2 is not None else (tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1])
        out, flat_in = l * k, m * n
    layer = layers.get(name)
    if layer is None:
        return None
    if layer.kernel is None:
        return (int(out), int(flat_in))
    kh, kw = layer.kernel
    return (int(out), int(flat_in) // (kh * kw), kh, kw)


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
    if any(m.dora_scale is not None for m in modules):  # as kohya_ss records a LyCORIS DoRA run
        import json

        args = json.loads(meta.get("ss_network_args", "{}"))
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", **args})
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
        if m.source is not None:  # LoHa / LoKr: the file's own tensors
            for key, value in m.source.items():
                sd[f"{m.name}.{key}"] = value.detach().to("cpu", dtype or value.dtype).contiguous()
            continue
        if m.dora_scale is not None:
            sd[f"{m.name}.dora_scale"] = m.dora_scale.detach().to("cpu", dtype or m.dora_scale.dtype).contiguous()
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

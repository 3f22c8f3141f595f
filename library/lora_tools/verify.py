"""The LoRA file contract checker (docs/lora_format.md).

Finds what makes WebUI, ComfyUI, diffusers or sd-scripts load a file differently or not at all:
unknown names (silently dropped), text-encoder names without `text_model_`, missing or zero alpha,
rank or shape mismatches, NaN/Inf, unusual dtypes, a stale `sshs_model_hash`, metadata that
breaks diffusers or WebUI. `check_lora_weights.py --verify` prints the report; train_network
checks every file it writes with `check_saved_lora`.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.lora_tools.model_fit import Layer, sd15_layers, shape_problem, target_layers
from networks import lora_format as fmt

JSON_KEYS = ("ss_tag_frequency", "ss_bucket_info", "ss_dataset_dirs", "ss_network_args", "ss_datasets")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Report:
    path: Path
    modules: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, what: str, example: str) -> None:
        self.problems[what].append(example)

    def lines(self, examples: int = 3) -> list[str]:
        out = []
        for what, items in self.problems.items():
            more = f", ... ({len(items)} in all)" if len(items) > examples else ""
            out.append(f"{what}: {', '.join(items[:examples])}{more}")
        return out

    def format(self) -> str:
        if self.ok:
            head = f"{self.path}: OK ({self.modules} modules)"
        else:
            head = f"{self.path}: {len(self.problems)} kinds of problem"
        return "\n".join([head] + [f"  - {line}" for line in self.lines()]
                         + [f"  note: {note}" for note in self.notes])


def verify_lora_file(path, layers: dict[str, Layer] | None = None, check_sizes: bool = False) -> Report:
    """Check one file; `layers` defaults to SD1.x's (sizes then unchecked: tiny models share the names)."""
    from library.models.checkpoint_io import check_exists, load_state_dict, read_safetensors_metadata

    path = check_exists(path, "LoRA file", flag="the LoRA file")
    layers = sd15_layers() if layers is None else layers
    report = Report(path)
    sd = load_state_dict(path)
    reason = fmt.not_a_lora_reason(sd)
    if reason:
        report.add("not a LoRA file", reason)
        return report
    modules: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        if "." + suffix not in fmt.TENSOR_SUFFIXES:
            report.add("unknown tensors (WebUI and ComfyUI drop them silently)", key)
            continue
        modules[name][suffix] = value
        if value.dtype not in DTYPES:
            report.add("dtype other than fp16/bf16/fp32", f"{key} ({value.dtype})")
        if value.is_floating_point() and not torch.isfinite(value).all():
            report.add("NaN or Inf values", key)
    report.modules = len(modules)
    if not modules:
        report.add("no LoRA modules", "no *.lora_down.weight / *.lora_up.weight tensors")
    for name, tensors in sorted(modules.items()):
        _check_module(report, name, tensors, layers, check_sizes)
    _check_alphas_agree(report, modules)
    if path.suffix.lower() == ".safetensors":
        _check_metadata(report, path, read_safetensors_metadata(path))
    return report


def _check_module(report: Report, name: str, tensors: dict, layers, check_sizes: bool) -> None:
    layer = layers.get(name)
    if layer is None:
        if name.startswith(fmt.TE_PREFIX + "_") and layers.get(fmt.canonical_key(name)) is not None:
            report.add("text-encoder names without text_model_ (WebUI, ComfyUI and sd-scripts ignore them)", name)
        else:
            report.add("names of no SD1.x layer (WebUI and ComfyUI drop them silently)", name)
    down, up, alpha = (tensors.get(s) for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    if down is None or up is None:
        report.add("modules without lora_down or lora_up", name)
        return
    if alpha is None:
        report.add("missing alpha (clients disagree on the default)", name)
    elif alpha.numel() != 1 or not torch.isfinite(alpha).all() or float(alpha) <= 0:
        report.add("alpha not a single number > 0 (sd-scripts reads 0 as the rank, the others as 0)",
                   f"{name} ({alpha.flatten()[:2].tolist()})")
    if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]:
        report.add("rank mismatch (down's first size != up's second)",
                   f"{name} (down {list(down.shape)}, up {list(up.shape)})")
        return
    if layer is not None:
        why = shape_problem(layer, down.shape, up.shape, check_sizes)
        if why:
            report.add("shapes that do not fit the layer", f"{name}: {why}")


def _check_alphas_agree(report: Report, modules: dict) -> None:
    linear = {float(t["alpha"]) for t in modules.values()
              if "alpha" in t and "lora_down.weight" in t and t["alpha"].numel() == 1
              and (t["lora_down.weight"].dim() == 2 or tuple(t["lora_down.weight"].shape[2:]) == (1, 1))}
    if len(linear) > 1:
        report.notes.append(f"Linear modules have {len(linear)} different alphas ({sorted(linear)[:4]}); "
                            "diffusers applies its most common alpha to attention layers instead.")


def _check_metadata(report: Report, path: Path, metadata: dict) -> None:
    stored = metadata.get("sshs_model_hash")
    if stored is None:
        report.notes.append("no sshs_model_hash in the metadata (WebUI computes its own hash).")
    elif stored != fmt.data_section_sha256(path):
        report.add("stale sshs_model_hash (WebUI shows and records a wrong hash)", stored[:12])
    if "lora_adapter_metadata" in metadata:
        report.add("lora_adapter_metadata in a kohya-format file (diffusers raises)", "lora_adapter_metadata")
    for key in JSON_KEYS:
        value = metadata.get(key)
        if value in (None, "None", ""):
            continue
        try:
            json.loads(value)
        except ValueError:
            report.add("malformed JSON in metadata (breaks WebUI's metadata editor)", key)


def check_saved_lora(path, unet=None, text_encoder=None) -> Report:
    """Verify a file this program just wrote, against the model it was trained on; raise if broken."""
    layers = target_layers(unet, text_encoder) if unet is not None or text_encoder is not None else None
    report = verify_lora_file(path, layers, check_sizes=layers is not None)
    if not report.ok:
        diverged = "NaN or Inf values" in report.problems
        raise UserError(
            f"the LoRA file just written, {path}, breaks the LoRA file contract: "
            + "; ".join(report.lines()) + ".", path=path,
            fix=("training diverged: lower --learning_rate, keep --max_grad_norm on, or use "
                 "--mixed_precision bf16 instead of fp16." if diverged else
                 "this is a bug in this program; please report it with this message."))
    return report

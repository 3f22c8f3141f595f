"""Import a kohya_ss GUI preset (its JSON: the GUI's own parameter names, every field present,
numbers often as strings, "" or 0 meaning "not set") into the values of one of our scripts.

What maps: keys that are our option names already, kohya_ss's renamed ones (optimizer ->
optimizer_type, max_resolution -> resolution, epoch -> max_train_epochs, lr_warmup % ->
lr_warmup_steps as a fraction, lora_network_weights -> network_weights), LoRA_type with its
conv/LyCORIS fields -> network_module + network_args, optimizer_args and additional_parameters
(parsed with the script's own parser), and the sample prompts text (written to a file by the
caller). Everything else that asks for something (not empty, not false, not 0) is reported as
having no equivalent, with its value, and kept in the preset's [preset.unknown] table.

No Tk here: tested without a display.
"""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from gui.specs import FieldSpec, parse_text, specs_from_parser

RENAMED = {"optimizer": "optimizer_type", "max_resolution": "resolution", "lora_network_weights": "network_weights",
           "use_wandb": "log_with"}
# LoRA_type -> (network_module, LyCORIS algo or None)
NETWORK_TYPES = {
    "Standard": ("networks.lora", None),
    "Kohya LoCon": ("networks.lora", None),
    "LoCon": ("networks.lora", None),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
}
# kohya_ss fields that become network_args items (name -> when they apply)
CONV_KEYS = ("conv_dim", "conv_alpha")
LYCORIS_ARGS = ("factor", "use_tucker", "use_scalar", "rank_dropout_scale", "train_norm", "decompose_both",
                "constrain", "rescaled", "use_cp", "dora_wd")
NETWORK_ARGS = ("rank_dropout", "module_dropout", "block_dims", "block_alphas", "conv_block_dims",
                "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
# Only meaningful to kohya_ss itself (its window, accelerate launch, its file pickers), never a run setting
GUI_ONLY = {"model_list", "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
            "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
            "extra_accelerate_launch_args", "save_as_bool", "sdxl_checkbox", "wandb_api_key", "wandb_run_name", "huggingface_token", "huggingface_repo_id",
            "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility", "async_upload",
            "save_state_to_huggingface", "resume_from_huggingface", "metadata_author", "metadata_description",
            "metadata_license", "metadata_tags", "metadata_title", "save_model_as_bool"}


@dataclass
class Imported:
    values: dict = field(default_factory=dict)
    unmapped: dict = field(default_factory=dict)        # kohya_ss key -> value with no equivalent
    notes: list[str] = field(default_factory=list)      # what was translated and how
    prompts_text: str | None = None                     # kohya_ss keeps sample prompts as text

    def report(self) -> str:
        lines = list(self.notes)
        if self.unmapped:
            lines.append("no equivalent (kept in [preset.unknown], not passed to the script): " +
                         ", ".join(f"{k}={v!r}" for k, v in sorted(self.unmapped.items())))
        return "\n".join(lines)


def _asks_for_something(value) -> bool:
    return value not in (None, "", False, 0, 0.0, "0", "0.0", [], {})


def _number_text(value) -> str:
    """kohya_ss stores whole numbers as floats (64.0) and numbers as strings: our parsers want '64'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _arg_text(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return _number_text(value)


def convert(data: dict, parser: argparse.ArgumentParser) -> Imported:
    """kohya_ss JSON (as a dict) -> our values for `parser`'s script."""
    if not isinstance(data, dict):
        raise ValueError("a kohya_ss preset is a JSON object of settings")
    specs = {s.dest: s for s in specs_from_parser(parser)}
    out = Imported()
    data = dict(data)

    def put(dest: str, raw, source: str):
        spec: FieldSpec | None = specs.get(dest)
        if spec is None:
            out.unmapped[source] = raw
            return
        if spec.kind == "bool":
            if raw in (True, "true", "True", 1):
                out.values[dest] = spec.const if spec.const is not None else True
            return
        if spec.kind == "list":
            items = raw if isinstance(raw, list) else shlex.split(str(raw))
            text = shlex.join(str(i) for i in items)
        else:
            text = _number_text(raw)
        try:
            value = parse_text(spec, text)
        except ValueError as err:
            if not _asks_for_something(raw):
                return          # kohya_ss's 0 / "" for "off": our default already means that
            out.unmapped[source] = raw
            out.notes.append(f"{source}={raw!r} is not a valid {dest} here ({err}).")
            return
        if value is not None and value != spec.default:
            out.values[dest] = value

    # --- the network: LoRA_type and its fields -> network_module + network_args -------------------
    lora_type = data.pop("LoRA_type", None)
    network_args: list[str] = []
    algo = None
    if lora_type is not None and "network_module" in specs:
        if lora_type in NETWORK_TYPES:
            module, algo = NETWORK_TYPES[lora_type]
            put("network_module", module, "LoRA_type")
            if algo:
                if data.get("dora_wd") in (True, "true") and algo in ("lora", "locon"):
                    algo = "dora"
                network_args.append(f"algo={algo}")
                out.notes.append(f"LoRA_type {lora_type!r} -> network_module {module}, network_args algo={algo}.")
        else:
            out.unmapped["LoRA_type"] = lora_type
    uses_conv = lora_type in ("Kohya LoCon", "LoCon") or algo is not None
    for key in CONV_KEYS:
        value = data.pop(key, None)
        if uses_conv and _asks_for_something(value):
            network_args.append(f"{key}={_arg_text(value)}")
    for key in LYCORIS_ARGS:
        value = data.pop(key, None)
        if algo is not None and _asks_for_something(value) and not (key == "dora_wd"):
            network_args.append(f"{key}={_arg_text(value)}")
        elif algo is None and _asks_for_something(value) and key != "dora_wd":
            out.unmapped[key] = value
    preset_name = data.pop("LyCORIS_preset", None)
    if algo is not None and _asks_for_something(preset_name):
        network_args.append(f"preset={preset_name}")
    for key in NETWORK_ARGS:
        value = data.pop(key, None)
        if _asks_for_something(value):
            network_args.append(f"{key}={_arg_text(value)}")
    if network_args and "network_args" in specs:
        out.values["network_args"] = network_args

    # --- renamed and computed ------------------------------------------------------------------------
    epoch = data.pop("epoch", None)
    if _asks_for_something(epoch) and not _asks_for_something(data.get("max_train_epochs")):
        put("max_train_epochs", epoch, "epoch")
    warmup = data.pop("lr_warmup", None)
    if _asks_for_something(warmup) and not _asks_for_something(data.get("lr_warmup_steps")):
        # kohya_ss: a percentage of the training steps; our lr_warmup_steps takes that as a fraction
        put("lr_warmup_steps", float(warmup) / 100, "lr_warmup")
        out.notes.append(f"lr_warmup {warmup}% -> lr_warmup_steps {float(warmup) / 100:g} (a fraction of the steps).")
    noise_type = data.pop("noise_offset_type", "Original")
    if noise_type == "Multires":
        data.pop("noise_offset", None)
    else:
        data.pop("multires_noise_iterations", None)
        data.pop("multires_noise_discount", None)
    if data.pop("use_wandb", False) in (True, "true"):
        put("log_with", "wandb", "use_wandb")
    xformers = data.pop("xformers", None)
    if xformers in (True, "xformers"):
        put("xformers", True, "xformers")
    elif xformers == "sdpa":
        put("sdpa", True, "xformers")
    prompts = data.pop("sample_prompts", None)
    if isinstance(prompts, str) and prompts.strip():
        out.prompts_text = prompts.strip() + "\n"
    extra = data.pop("additional_parameters", "")

    # --- everything else: our name, a renamed one, or no equivalent ----------------------------------
    for key, value in data.items():
        dest = RENAMED.get(key, key)
        if dest in specs:
            if _asks_for_something(value) or specs[dest].kind == "bool":
                put(dest, value, key)
        elif key in GUI_ONLY:
            continue
        elif _asks_for_something(value):
            out.unmapped[key] = value

    # --- additional parameters: flags for the script, parsed by its parser -----------------------------
    if isinstance(extra, str) and extra.strip():
        try:
            words = shlex.split(extra)
        except ValueError as err:
            out.notes.append(f"additional_parameters could not be read ({err}): {extra!r}")
            words = []
        known, rest = _parse_flags(parser, words)
        for dest, value in known.items():
            if dest in specs:
                out.values[dest] = list(value) if isinstance(value, tuple) else value
        if rest:
            out.unmapped["additional_parameters"] = shlex.join(rest)
        if known:
            out.notes.append(f"additional_parameters -> {', '.join(sorted(known))}.")
    return out


def _parse_flags(parser: argparse.ArgumentParser, words: list[str]) -> tuple[dict, list[str]]:
    """The options among `words` that the parser knows (non-default values only), and the rest."""
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        namespace, rest = parser.parse_known_args(words, argparse.Namespace(**{d: defaults[d] for d in defaults}))
    except SystemExit:
        return {}, words
    known = {d: v for d, v in vars(namespace).items() if d in defaults and v != defaults[d]}
    return known, rest


def load_json(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a kohya_ss preset (a JSON object of settings)")
    return data

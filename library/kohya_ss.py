"""kohya_ss GUI presets (its LoRA tab's JSON) translated into our flags, as kohya_ss itself turns
them into an sd-scripts command (kohya_gui/lora_gui.py, train_model):

- `LoRA_type` picks --network_module and --network_args (Standard, Kohya LoCon, the LyCORIS types);
- `max_resolution` is --resolution, `optimizer` is --optimizer_type, `lr_warmup` (a percentage) is
  --lr_warmup_steps as a fraction of the run, `noise_offset_type` decides which noise keys count,
  the text-encoder and UNet learning rates decide --network_train_unet_only / _text_encoder_only;
- quoted argument strings (`optimizer_args`, `lr_scheduler_args`, `additional_parameters`) are split
  into arguments; empty strings and zeros that kohya_ss leaves out are left out;
- `sample_prompts` holds the prompt text itself (kohya_ss writes it to a file at run time).

    result = translate(json.loads(Path("my preset.json").read_text()))
    result.values      # flag name -> value, for train_network.py (or result.script)
    result.notes       # what had no equivalent, one line each

The caller keeps only the keys its parser knows and reports the rest (gui: Import kohya_ss preset;
tools/kohya_ss_preset.py: a TOML for --config_file).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

# Keys of the GUI's own: what window, machine and launcher it uses, not how to train.
GUI_ONLY = {"LoRA_type", "LyCORIS_preset", "additional_parameters", "gpu_ids", "multi_gpu", "num_machines",
            "num_processes", "num_cpu_threads_per_process", "main_process_port", "dynamo_backend",
            "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "extra_accelerate_launch_args",
            "max_resolution", "optimizer", "lr_warmup", "noise_offset_type", "sdxl", "sdxl_cache_text_encoder_outputs",
            "sdxl_no_half_vae", "xformers", "conv_dim", "conv_alpha", "factor", "decompose_both", "use_tucker",
            "use_cp", "use_scalar", "train_norm", "dora_wd", "bypass_mode", "rank_dropout_scale", "rank_dropout",
            "module_dropout", "constrain", "rescaled", "unit", "train_on_input", "block_dims", "block_alphas",
            "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
            "block_lr_zero_threshold", "lora_network_weights", "stop_text_encoder_training", "epoch",
            "model_list", "save_as_bool", "save_to", "sample_prompts", "text_encoder_lr", "unet_lr",
            "lr_warmup_steps", "training_comment", "print_only"}

# kohya_ss passes on only the keys of the chosen noise_offset_type.
NOISE_KEYS = {"Original": ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"),
              "Multires": ("multires_noise_iterations", "multires_noise_discount")}
# The LyCORIS algorithms kohya_ss offers that we train (networks.lycoris reads LyCORIS's arguments).
LYCORIS_ALGOS = {"LyCORIS/LoCon": "locon", "LoCon": "locon", "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}
NOT_TRAINED = {"LyCORIS/BOFT", "LyCORIS/Diag-OFT", "LyCORIS/DyLoRA", "LyCORIS/GLoRA", "LyCORIS/iA3",
               "LyCORIS/Native Fine-Tuning", "Kohya DyLoRA", "LoRA-FA", "Flux1", "Flux1 OFT", "HunyuanImage-2.1",
               "Anima", "Lumina", "Kohya LoHa", "Kohya LoKr"}


@dataclass
class Translation:
    values: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    script: str = "train_network"
    sample_prompts_text: str | None = None  # the prompts, for the caller to write into a file


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value, default=0.0) -> float:
    try:
        return default if _blank(value) else float(value)
    except (TypeError, ValueError):
        return default


def _split(text) -> list[str]:
    """kohya_ss's rule for argument strings: quotes dropped, split on whitespace."""
    return str(text).replace('"', "").split()


def _network(gui: dict, out: Translation) -> None:
    kind = str(gui.get("LoRA_type", "Standard") or "Standard")
    args: list[str] = []
    if kind in LYCORIS_ALGOS:
        out.values["network_module"] = "lycoris.kohya"  # resolved to our implementation, with a notice
        algo = LYCORIS_ALGOS[kind]
        if gui.get("dora_wd") in (True, "True", "true"):
            algo = "dora" if algo == "locon" else algo
        args += [f"algo={algo}", f"conv_dim={gui.get('conv_dim', 1)}", f"conv_alpha={gui.get('conv_alpha', 1)}"]
        if algo == "lokr":
            args += [f"factor={gui.get('factor', -1)}", f"decompose_both={gui.get('decompose_both', False)}"]
        for key in ("preset", "rank_dropout", "module_dropout", "use_tucker", "train_norm"):
            value = gui.get("LyCORIS_preset" if key == "preset" else key)
            if not _blank(value) and value not in (0, 0.0, False, "full" if key == "preset" else None):
                args.append(f"{key}={value}")
    elif kind in ("Standard", "Kohya LoCon"):
        out.values["network_module"] = "networks.lora"
        if kind == "Kohya LoCon":
            args += [f"conv_dim={gui.get('conv_dim', 1)}", f"conv_alpha={gui.get('conv_alpha', 1)}"]
        for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                    "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout"):
            if not _blank(gui.get(key)) and gui.get(key) not in (0, 0.0):
                args.append(f"{key}={gui[key]}")
    else:
        out.values["network_module"] = "networks.lora"
        why = "not trained by this toolkit" if kind in NOT_TRAINED else "unknown"
        out.notes.append(f"LoRA_type {kind!r} is {why}; imported as a plain LoRA (networks.lora) — check "
                         "the network settings before training.")
    if args:
        out.values["network_args"] = args
    if not _blank(gui.get("lora_network_weights")):
        out.values["network_weights"] = gui["lora_network_weights"]


def translate(gui: dict) -> Translation:
    """A kohya_ss LoRA-tab JSON -> our flag values (see the module docstring)."""
    out = Translation()
    if gui.get("sdxl") in (True, "True", "true"):
        out.script = "sdxl_train_network"
        out.notes.append("the preset is for SDXL (sdxl_train_network.py).")
    _network(gui, out)
    values = out.values
    if not _blank(gui.get("max_resolution")):
        values["resolution"] = str(gui["max_resolution"])
    if not _blank(gui.get("optimizer")):
        values["optimizer_type"] = gui["optimizer"]
    for key in ("optimizer_args", "lr_scheduler_args"):
        if not _blank(gui.get(key)):
            values[key] = _split(gui[key])
    # learning rates and what trains (kohya_ss's resolve_network_train_flags)
    te_lr, unet_lr = _number(gui.get("text_encoder_lr")), _number(gui.get("unet_lr"))
    if te_lr > 0:
        values["text_encoder_lr"] = [te_lr]
    if unet_lr > 0:
        values["unet_lr"] = unet_lr
    if te_lr == 0 and unet_lr != 0:
        values["network_train_unet_only"] = True
    elif te_lr != 0 and unet_lr == 0:
        values["network_train_text_encoder_only"] = True
    # warmup: absolute steps win, else the percentage as a fraction of the run
    steps, percent = _number(gui.get("lr_warmup_steps")), _number(gui.get("lr_warmup"))
    if steps > 0:
        values["lr_warmup_steps"] = int(steps)
    elif percent > 0:
        values["lr_warmup_steps"] = percent / 100
    if _number(gui.get("stop_text_encoder_training")) > 0:
        out.notes.append("stop_text_encoder_training is ignored (kohya_ss does not pass it on either).")
    # noise: only the chosen kind's keys count
    multires = gui.get("noise_offset_type") == "Multires"
    for key in NOISE_KEYS["Multires" if multires else "Original"]:
        if _number(gui.get(key)) != 0:
            values[key] = gui[key]
    attention = str(gui.get("xformers", "") or "")
    if attention in ("xformers", "sdpa"):
        values[attention] = True
    if not _blank(gui.get("sample_prompts")):
        out.sample_prompts_text = str(gui["sample_prompts"])
    # everything else is already a flag name; kohya_ss leaves out empty strings and zeros that mean "off"
    zero_means_off = {"max_train_epochs", "max_train_steps", "min_snr_gamma", "min_timestep", "max_timestep",
                      "ip_noise_gamma", "save_every_n_epochs", "save_every_n_steps", "save_last_n_steps",
                      "save_last_n_steps_state", "save_last_n_epochs", "save_last_n_epochs_state",
                      "sample_every_n_epochs", "sample_every_n_steps", "clip_skip", "scale_weight_norms"}
    for key, value in gui.items():
        if key in GUI_ONLY or key in values or _blank(value) or any(key in keys for keys in NOISE_KEYS.values()):
            continue
        if key in zero_means_off and _number(value, default=1) == 0:
            continue
        values[key] = value
    if not _blank(gui.get("additional_parameters")):
        values["__extra_arguments__"] = shlex.split(str(gui["additional_parameters"]))
    return out


def _convert(action, value):
    """A JSON value as the parser would have read it from the command line."""
    import argparse

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    items = value if isinstance(value, list) else None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = items if items is not None else _split(value)
        return [action.type(str(v)) if action.type else v for v in items]
    if items is not None:
        if len(items) != 1:
            raise ValueError(f"takes one value, got {len(items)}")
        value = items[0]
    if action.type is None:
        return str(value) if not isinstance(value, str) else value
    converted = action.type(str(value) if not isinstance(value, bool) else str(int(value)))
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    # a type that returns what TOML cannot hold (resolution's tuple) keeps the text; the script reads it again
    return str(value) if isinstance(converted, tuple) else converted


def to_flags(result: Translation, parser) -> tuple[dict, list[str]]:
    """The translation's values that `parser` has options for, converted by the parser's own types;
    notes name every key that was left out and why. Values equal to the parser's defaults are dropped."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help",)}
    values, notes = {}, list(result.notes)
    ignored = []
    for key, value in result.values.items():
        if key == "__extra_arguments__":
            continue
        action = actions.get(key)
        if action is None:
            ignored.append(key)
            continue
        try:
            converted = _convert(action, value)
        except (TypeError, ValueError, Exception) as err:  # argparse types raise ArgumentTypeError too
            notes.append(f"{key} = {value!r} was not imported: {err}")
            continue
        if converted != action.default:
            values[key] = converted
    extra = result.values.get("__extra_arguments__")
    if extra:
        import argparse

        try:
            parsed, unknown = parser.parse_known_args(extra, namespace=argparse.Namespace())
        except SystemExit:
            notes.append(f"additional_parameters {' '.join(extra)!r} could not be read; set them by hand.")
        else:
            for key, value in vars(parsed).items():
                if key in actions and value != actions[key].default:
                    values[key] = value
            if unknown:
                notes.append(f"additional_parameters not known here, left out: {' '.join(unknown)}")
    if ignored:
        notes.append(f"{len(ignored)} setting(s) with no equivalent here, left out: {', '.join(sorted(ignored))}")
    return values, notes

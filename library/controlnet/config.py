"""Config files for the ControlNet scripts: flat TOML of flag names (like every script here) or the
radar recipe's YAML-shaped sections, from a .toml or a .yaml file (`--config_file` or `--config`).

    project:        name -> output_name, output_dir, logging_dir
    model:          pretrained_model_name_or_path (or path), vae
    data:           data_dir -> train_data_dir, listing -> train_listing, resolution, range_max, vel_max, ...
    training:       num_train_epochs -> max_train_epochs, save_steps -> save_every_n_steps,
                    dataloader_num_workers -> max_data_loader_n_workers, mode (controlnet|lora|joint),
                    any flag name (learning_rate, lora_rank, heatmap_sigma, loss_weight_factor, ...)
    controlnet:     path -> controlnet_path, pretrained -> controlnet_model_name_or_path
    early_stopping: enabled, patience, min_delta -> early_stopping_patience / _min_delta
    stage1/stage2:  joint mode (their presence turns it on); stage2's num_train_epochs, max_train_steps,
                    learning_rate (the ControlNet's), lora_learning_rate, loss_weight_factor

Keys that are flag names work in any section. An unknown key is an error that names it.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from library import args as A
from library.errors import UserError

# (section, key) -> flag; section None = in any section
KEY_MAP = {
    ("project", "name"): "output_name", ("model", "path"): "pretrained_model_name_or_path",
    ("data", "data_dir"): "train_data_dir", ("data", "listing"): "train_listing",
    ("controlnet", "path"): "controlnet_path", ("controlnet", "pretrained"): "controlnet_model_name_or_path",
    ("early_stopping", "patience"): "early_stopping_patience",
    ("early_stopping", "min_delta"): "early_stopping_min_delta",
    ("stage2", "num_train_epochs"): "stage2_max_train_epochs", ("stage2", "max_train_epochs"): "stage2_max_train_epochs",
    ("stage2", "max_train_steps"): "stage2_max_train_steps", ("stage2", "learning_rate"): "stage2_learning_rate",
    ("stage2", "controlnet_learning_rate"): "stage2_learning_rate",
    ("stage2", "loss_weight_factor"): "stage2_loss_weight_factor",
    (None, "num_train_epochs"): "max_train_epochs", (None, "save_steps"): "save_every_n_steps",
    (None, "dataloader_num_workers"): "max_data_loader_n_workers",
}
MODES = {"controlnet": {}, "lora": {"train_unet_lora": True}, "unet_lora": {"train_unet_lora": True},
         "joint": {"joint": True}}


def load_raw(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError("the config file does not exist.", path=path,
                        fix="pass the path of a .toml or .yaml config (--config_file / --config).")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            import toml

            data = toml.loads(text)
    except Exception as err:  # yaml.YAMLError, toml.TomlDecodeError: the message names the line
        raise UserError(f"the config file {path} cannot be read ({err}).", path=path,
                        fix="correct the line named above.") from None
    if not isinstance(data, dict):
        raise UserError(f"the config file {path} is not a table of settings.", path=path,
                        fix="write key: value pairs (YAML) or key = value (TOML).")
    data.pop(A.PRESET_TABLE, None)  # the GUI's bookkeeping, as in library.args
    return data


def flag_values(parser: argparse.ArgumentParser, data: dict, path) -> dict:
    """Seed sections and flat keys -> {flag dest: value}."""
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    out: dict = {}

    def put(dest, value, where):
        if dest not in dests:
            close = difflib.get_close_matches(dest, dests, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown key '{where}' in the config file {path}.{hint}", path=path,
                            fix="remove the key or correct its name (docs/train_controlnet.md, Config files).")
        out[dest] = value

    def walk(table: dict, section: str | None, trail: str):
        for key, value in table.items():
            where = f"{trail}{key}"
            if isinstance(value, dict):
                walk(value, key if section is None else section, where + ".")
                continue
            if key in ("config_file", "output_config"):
                continue
            if section in ("stage1", "stage2"):
                out["joint"] = True
                if key == "heatmap_sigma" and section == "stage2":
                    out["_stage2_sigma"] = value
                    continue
            if section == "early_stopping" and key == "enabled":
                out["_early_stopping_enabled"] = bool(value)
                continue
            if key == "mode" and section in (None, "training", "project"):
                if str(value) not in MODES:
                    raise UserError(f"unknown mode {value!r} in {path}.", path=path,
                                    fix=f"use one of: {', '.join(MODES)}.")
                out.update(MODES[str(value)])
                continue
            dest = KEY_MAP.get((section, key)) or KEY_MAP.get((None, key)) or key
            put(dest, value, where)

    walk(data, None, "")
    sigma2 = out.pop("_stage2_sigma", None)
    if sigma2 is not None and "heatmap_sigma" in out and float(sigma2) != float(out["heatmap_sigma"]):
        raise UserError(f"stage2.heatmap_sigma ({sigma2}) differs from stage 1's ({out['heatmap_sigma']}) in {path}.",
                        path=path, fix="use one heatmap_sigma: the ControlNet learned blobs of that width.")
    if sigma2 is not None:
        out.setdefault("heatmap_sigma", sigma2)
    if out.pop("_early_stopping_enabled", True) is False:
        out.pop("early_stopping_patience", None)
    return out


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """library.args.parse_args with the sectioned YAML/TOML reader; command-line flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        actions = {a.dest: a for a in parser._actions if a.dest != "help"}
        values = flag_values(parser, load_raw(args.config_file), args.config_file)
        source = f"the config file {args.config_file}"
        parser.set_defaults(**{k: A._check_value(actions[k], v, source) for k, v in values.items()})
        args = parser.parse_args(argv)
    if args.output_config:
        A.write_config_file(parser, args)
        raise SystemExit(0)
    return args


def write_autofilled(src, updates: dict) -> Path:
    """A copy of config `src` named <stem>_autofilled<suffix> beside it, with `updates` (flag -> value)
    written where the file keeps them: in the recipe's section when it has one, else at the top level."""
    from library.fileio import write_text_atomic

    src = Path(src)
    data = load_raw(src)
    reverse = {flag: key for key, flag in KEY_MAP.items() if key[0] is not None}
    for flag, value in updates.items():
        section, key = reverse.get(flag, (None, flag))
        if section is not None and isinstance(data.get(section), dict):
            data[section][key] = value
        elif section is not None and flag not in data and any(isinstance(v, dict) for v in data.values()):
            data[section] = {key: value}
        else:
            data[flag] = value
    dst = src.with_name(f"{src.stem}_autofilled{src.suffix}")
    if src.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    else:
        from library import toml_writer

        text = toml_writer.dumps(data)
    write_text_atomic(dst, text)
    return dst

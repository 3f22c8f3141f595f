"""kohya's --dataset_config file: [general], [[datasets]] and [[datasets.subsets]] tables.

Every key is checked against the schema so a typo stops the run instead of being silently ignored.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from library.data.config import (DATASET_KEYS, SUBSET_KEYS, DatasetConfig, SubsetConfig,
                                 check_dataset_config, normalize_extension, parse_resolution)
from library.errors import UserError

BOOL, INT, STR, FLOAT = "true or false", "a whole number", "a string", "a number"

# Keys a subset may carry; all but image_dir, is_reg and metadata_file may also be set for a
# whole dataset or in [general] ("ascending" keys in kohya's terms).
SUBSET_TYPES = {
    "image_dir": STR, "is_reg": BOOL, "metadata_file": STR, "num_repeats": INT, "class_tokens": STR,
    "caption_extension": STR, "keep_tokens": INT, "shuffle_caption": BOOL, "flip_aug": BOOL,
    "color_aug": BOOL, "random_crop": BOOL, "caption_prefix": STR, "caption_suffix": STR,
    "caption_separator": STR, "keep_tokens_separator": STR, "secondary_separator": STR,
    "caption_dropout_rate": FLOAT, "caption_dropout_every_n_epochs": INT,
    "caption_tag_dropout_rate": FLOAT, "alpha_mask": BOOL, "conditioning_data_dir": STR,
    "resize_interpolation": STR,
}
# conditioning_data_dir is one folder's masks, so it belongs to that folder's subset (as in kohya).
SUBSET_ONLY = ("image_dir", "is_reg", "metadata_file", "conditioning_data_dir")
# DreamBooth-only keys: a fine-tuning subset (one with metadata_file) takes its captions from the
# metadata and has no class token or regularization role, so kohya's schema rejects these there.
DREAMBOOTH_ONLY = ("is_reg", "class_tokens", "caption_extension")
DATASET_TYPES = {
    "resolution": "a size", "batch_size": INT, "enable_bucket": BOOL, "min_bucket_reso": INT,
    "max_bucket_reso": INT, "bucket_reso_steps": INT, "bucket_no_upscale": BOOL,
}
# kohya keys this toolkit does not implement yet: named as such rather than as typos.
NOT_YET_SUPPORTED = (
    "face_crop_aug_range", "token_warmup_min", "token_warmup_step", "enable_wildcard",
    "custom_attributes", "cache_info",
    "validation_seed", "validation_split", "network_multiplier",
)
assert set(SUBSET_TYPES) == set(SUBSET_KEYS) and set(DATASET_TYPES) <= set(DATASET_KEYS)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"the dataset config file {path} does not exist.", path=path,
                        fix="check the path given to --dataset_config.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"the dataset config {path} is not valid UTF-8 text.", path=path,
                        fix="re-save the file as UTF-8.") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"the dataset config {path} is not valid JSON: {err}.", path=path,
                            fix="fix the JSON syntax at that line.") from None
    try:
        import tomllib

        return tomllib.loads(text)
    except ImportError:  # Python 3.10: the toml package from requirements
        import toml

        try:
            return toml.loads(text)
        except toml.TomlDecodeError as err:
            raise UserError(f"the dataset config {path} is not valid TOML: {err}.", path=path,
                            fix="fix the TOML syntax at that line.") from None
    except ValueError as err:  # tomllib.TOMLDecodeError, which names the line and column
        raise UserError(f"the dataset config {path} is not valid TOML: {err}.", path=path,
                        fix="fix the TOML syntax at that line (strings need quotes, tables "
                            "[[datasets]] and [[datasets.subsets]]).") from None


def _check_keys(table: dict, allowed: dict, where: str, path: Path, skip=()) -> None:
    for key in table:
        if key in skip:
            continue
        if key in allowed:
            continue
        if key in NOT_YET_SUPPORTED:
            raise UserError(f"the key '{key}' in {where} of {path} is a kohya option this toolkit does "
                            "not support yet.", path=path, fix=f"remove '{key}' from {where}.")
        where_ok = [n for n, keys in (("[[datasets.subsets]]", SUBSET_TYPES),
                                      ("[[datasets]] or [general]", DATASET_TYPES)) if key in keys]
        if where_ok:
            raise UserError(f"the key '{key}' cannot be set in {where} of {path}; it belongs in "
                            f"{where_ok[0]}.", path=path, fix=f"move '{key}' to {where_ok[0]}.")
        close = difflib.get_close_matches(key, list(allowed) + list(skip), n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown key '{key}' in {where} of {path}.", path=path,
                        fix=f"{hint}Valid keys there: {', '.join(sorted(allowed))}.")


def _check_types(table: dict, where: str, path: Path) -> dict:
    """Return the table with values checked and normalized (resolution -> (w, h), extension dot)."""
    out = {}
    for key, value in table.items():
        kind = SUBSET_TYPES.get(key) or DATASET_TYPES.get(key)
        if key == "resolution":
            value = parse_resolution(value, f"'resolution' in {where}", path)
        elif kind == BOOL and not isinstance(value, bool) or \
                kind == INT and (isinstance(value, bool) or not isinstance(value, int)) or \
                kind == FLOAT and (isinstance(value, bool) or not isinstance(value, (int, float))) or \
                kind == STR and not isinstance(value, str):
            raise UserError(f"'{key}' in {where} of {path} must be {kind}; got {value!r}.", path=path,
                            fix=f"write '{key}' as {kind}" + (" (without quotes)." if kind != STR
                                                              else " in quotes."))
        if key == "caption_extension":
            value = normalize_extension(value)
        if key == "resize_interpolation":
            from library.data.transforms import RESIZE_INTERPOLATIONS

            if value not in RESIZE_INTERPOLATIONS:
                raise UserError(f"'resize_interpolation' in {where} of {path} is {value!r}.", path=path,
                                fix=f"use one of: {', '.join(RESIZE_INTERPOLATIONS)}.")
        if kind == FLOAT:
            value = float(value)
        out[key] = value
    return out


def _resolve_dir(image_dir: str, config_path: Path) -> str:
    """kohya reads image_dir (and metadata_file) relative to the working folder; also accept them
    relative to the config file."""
    p = Path(image_dir).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    beside = config_path.parent / p
    return str(beside) if beside.exists() else str(p)


def load_dataset_config(config_path, defaults: dict) -> list[DatasetConfig]:
    """Parse the file; `defaults` are the command-line values (see config.flag_defaults)."""
    path = Path(config_path)
    data = _read(path)
    _check_keys(data, {"general": None, "datasets": None}, "the top level", path)
    general = data.get("general", {})
    datasets = data.get("datasets", [])
    if not isinstance(general, dict):
        raise UserError(f"'general' in {path} must be a table [general].", path=path,
                        fix="write the shared settings under a [general] line.")
    general_allowed = {k: v for k, v in {**SUBSET_TYPES, **DATASET_TYPES}.items() if k not in SUBSET_ONLY}
    _check_keys(general, general_allowed, "[general]", path)
    general = _check_types(general, "[general]", path)
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"the dataset config {path} has no [[datasets]] table.", path=path,
                        fix="add a [[datasets]] table with at least one [[datasets.subsets]] that "
                            "sets image_dir.")

    configs = []
    for di, dataset in enumerate(datasets, 1):
        where = f"[[datasets]] #{di}"
        _check_keys(dataset, general_allowed, where, path, skip=("subsets",))
        subsets = dataset.get("subsets", [])
        dataset = _check_types({k: v for k, v in dataset.items() if k != "subsets"}, where, path)
        if not isinstance(subsets, list) or not subsets:
            raise UserError(f"{where} in {path} has no [[datasets.subsets]].", path=path,
                            fix=f"add a [[datasets.subsets]] with image_dir = \"FOLDER\" after {where}.")
        merged = {**defaults, **general, **dataset}
        config = DatasetConfig(source=str(path), **{k: merged[k] for k in DATASET_KEYS})
        if not all(isinstance(sub, dict) for sub in subsets):
            raise UserError(f"a [[datasets.subsets]] of {where} in {path} is not a table.", path=path,
                            fix="write each subset as a [[datasets.subsets]] table.")
        kinds = {"metadata_file" in sub for sub in subsets}
        if len(kinds) > 1:
            raise UserError(f"{where} in {path} mixes subsets with metadata_file (fine-tuning) and "
                            "without (DreamBooth folders); kohya does not allow that.", path=path,
                            fix="put the metadata_file subsets in a [[datasets]] of their own.")
        for si, subset in enumerate(subsets, 1):
            swhere = f"[[datasets.subsets]] #{si} of {where}"
            _check_keys(subset, SUBSET_TYPES, swhere, path)
            subset = _check_types(subset, swhere, path)
            if "metadata_file" in subset:
                wrong = [k for k in DREAMBOOTH_ONLY if k in subset]
                if wrong:
                    raise UserError(f"{swhere} in {path} has metadata_file, so it is a fine-tuning "
                                    f"subset, which cannot set {', '.join(wrong)}.", path=path,
                                    fix=f"remove {', '.join(wrong)} from that subset (captions come "
                                        "from the metadata file).")
                subset["metadata_file"] = _resolve_dir(subset["metadata_file"], path)
            elif not subset.get("image_dir"):
                raise UserError(f"{swhere} in {path} has no image_dir.", path=path,
                                fix="add image_dir = \"FOLDER\" to that subset.")
            # The flag's mask folder (--conditioning_data_dir) does not apply to subsets of a config file;
            # there each subset names its own, as in kohya.
            values = {**merged, "image_dir": None, "conditioning_data_dir": None, **subset}
            for key in ("image_dir", "conditioning_data_dir"):
                if values[key]:
                    values[key] = _resolve_dir(values[key], path)
            config.subsets.append(SubsetConfig(**{k: values[k] for k in SUBSET_KEYS if k in values}))
        check_dataset_config(config, path)
        configs.append(config)
    return configs

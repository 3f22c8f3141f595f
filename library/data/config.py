"""Dataset settings: what one folder of images (a subset) and one dataset (subsets sharing a
resolution and batch size) need, built from kohya's command-line flags or a TOML file.

Values follow kohya's precedence: subset > dataset > general > command-line flag > default.
A subset is either a DreamBooth folder (images + caption files) or, when it has a
`metadata_file`, kohya's fine-tuning metadata JSON (`--in_json`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from library.errors import UserError

# kohya's <repeats>_<class tokens> folder naming, e.g. "10_sks dog".
REPEATS_DIR_RE = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)


@dataclass
class SubsetConfig:
    """One image folder (or metadata file) and how its images and captions are used."""

    image_dir: str | None  # None only for a metadata_file whose keys are image paths
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    caption_extension: str = ".caption"
    keep_tokens: int = 0
    shuffle_caption: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    metadata_file: str | None = None  # kohya fine-tuning metadata JSON (--in_json)
    # Loss masks (see library.data.masks): the images' alpha channel, or a mask image with the
    # same name in this folder (only with --masked_loss, as in kohya).
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None
    resize_interpolation: str | None = None  # --resize_interpolation (None: area down, Lanczos up)

    @property
    def name(self) -> str:
        """How kohya names the subset in ss_* metadata: the metadata file, else the folder."""
        return os.path.basename(os.path.normpath(self.metadata_file or self.image_dir or ""))


@dataclass
class DatasetConfig:
    """Subsets trained at one resolution and batch size; every batch comes from one dataset."""

    subsets: list[SubsetConfig] = field(default_factory=list)
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    # Where the settings came from, for error messages: "--train_data_dir" or the TOML path.
    source: str = "command line"
    # DreamBooth mode only: the folders as given, so the scanner can explain what is wrong with them.
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    # Set by the builder: fine-tuning metadata gave every image its bucket (train_resolution).
    metadata_buckets: bool = False

    @property
    def is_finetune(self) -> bool:
        """kohya's fine-tuning dataset: every subset reads a metadata file instead of captions."""
        return bool(self.subsets) and all(s.metadata_file for s in self.subsets)


SUBSET_KEYS = tuple(f.name for f in fields(SubsetConfig))
DATASET_KEYS = tuple(f.name for f in fields(DatasetConfig)
                     if f.name not in ("subsets", "source", "train_data_dir", "reg_data_dir",
                                       "metadata_buckets"))

# Command-line flag -> setting name, where kohya's flag is named differently.
FLAG_FOR_KEY = {"batch_size": "train_batch_size"}


def normalize_extension(ext: str | None) -> str:
    """kohya users write both "txt" and ".txt"; treat them the same."""
    ext = (ext or "").strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    return ext


def parse_resolution(value, where: str, path=None) -> tuple[int, int]:
    """Accept 512, "512", "512,768", [512, 768] or (512, 768); return (width, height)."""
    parts = value
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x ]+", value.strip()) if p]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    try:
        nums = [int(p) for p in parts]
    except (TypeError, ValueError):
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise UserError(f"{where} must be a size like 512 or 512,768 (width,height); got {value!r}.",
                        path=path, fix=f"set {where} to e.g. 512 or 512,768.")
    w, h = nums
    if w % 8 or h % 8:
        raise UserError(f"{where} {w},{h} is not a multiple of 8, which the VAE needs.", path=path,
                        fix=f"use a multiple of 8 for {where}, e.g. {w - w % 8 or 8},{h - h % 8 or 8}.")
    return w, h


def _arg(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def flag_defaults(args) -> dict:
    """The settings the command line gives (kohya's defaults where a flag is absent)."""
    # kohya's misspelled --caption_extention still works and, when given, wins (as in kohya).
    caption_ext = _arg(args, "caption_extention") or _arg(args, "caption_extension") or ".caption"
    return {
        "resolution": parse_resolution(_arg(args, "resolution", 512), "--resolution"),
        "batch_size": int(_arg(args, "train_batch_size", 1)),
        "enable_bucket": bool(_arg(args, "enable_bucket", False)),
        "min_bucket_reso": int(_arg(args, "min_bucket_reso", 256)),
        "max_bucket_reso": int(_arg(args, "max_bucket_reso", 1024)),
        "bucket_reso_steps": int(_arg(args, "bucket_reso_steps", 64)),
        "bucket_no_upscale": bool(_arg(args, "bucket_no_upscale", False)),
        "prior_loss_weight": float(_arg(args, "prior_loss_weight", 1.0)),
        "caption_extension": normalize_extension(caption_ext),
        "keep_tokens": int(_arg(args, "keep_tokens", 0)),
        "shuffle_caption": bool(_arg(args, "shuffle_caption", False)),
        "flip_aug": bool(_arg(args, "flip_aug", False)),
        "color_aug": bool(_arg(args, "color_aug", False)),
        "random_crop": bool(_arg(args, "random_crop", False)),
        "caption_prefix": _arg(args, "caption_prefix"),
        "caption_suffix": _arg(args, "caption_suffix"),
        "caption_separator": _arg(args, "caption_separator", ","),
        "keep_tokens_separator": _arg(args, "keep_tokens_separator", ""),
        "secondary_separator": _arg(args, "secondary_separator"),
        "caption_dropout_rate": float(_arg(args, "caption_dropout_rate", 0.0)),
        "caption_dropout_every_n_epochs": int(_arg(args, "caption_dropout_every_n_epochs", 0)),
        "caption_tag_dropout_rate": float(_arg(args, "caption_tag_dropout_rate", 0.0)),
        "alpha_mask": bool(_arg(args, "alpha_mask", False)),
        "resize_interpolation": _arg(args, "resize_interpolation"),
        # kohya reads mask images only for --masked_loss; other trainers (ControlNet) use the same
        # flag for their own conditioning images, which must not become loss masks.
        "conditioning_data_dir": _arg(args, "conditioning_data_dir") if _arg(args, "masked_loss") else None,
        # kohya: --dataset_repeats is the repeats of an --in_json dataset and the default
        # num_repeats of every dataset-config subset that does not set its own.
        "num_repeats": int(_arg(args, "dataset_repeats", 1)),
    }


def _subset_kwargs(values: dict) -> dict:
    return {k: values[k] for k in SUBSET_KEYS if k in values}


def _dataset_kwargs(values: dict) -> dict:
    return {k: values[k] for k in DATASET_KEYS if k in values}


def dreambooth_subsets(base_dir: str | None, is_reg: bool, defaults: dict) -> list[SubsetConfig]:
    """Subsets from a kohya DreamBooth folder: one per `<repeats>_<class tokens>` subfolder.

    Folder problems (missing, misnamed, images at the top level) are found later by the scanner,
    which reports every problem at once; here only well-named folders become subsets.
    """
    if not base_dir:
        return []
    base = Path(base_dir)
    if not base.is_dir():
        return []
    subsets = []
    for sub in sorted(base.iterdir(), key=lambda p: p.name):
        match = REPEATS_DIR_RE.match(sub.name)
        if not sub.is_dir() or sub.name.startswith(".") or not match:
            continue
        repeats = int(match.group(1))
        if repeats < 1:
            continue  # kohya skips "0_name" folders; the scanner says so
        values = dict(defaults, image_dir=str(sub), num_repeats=repeats, is_reg=is_reg,
                      class_tokens=match.group(2) or "")
        if is_reg:  # --conditioning_data_dir holds masks for the training images only
            values["conditioning_data_dir"] = None
        subsets.append(SubsetConfig(**_subset_kwargs(values)))
    return subsets


def dataset_configs_from_args(args) -> list[DatasetConfig]:
    """Dataset settings from an argparse Namespace with kohya's flag names.

    With --dataset_config the TOML file decides (flags fill in what it leaves out); otherwise
    --in_json gives one fine-tuning dataset (images in --train_data_dir), or --train_data_dir
    (and --reg_data_dir) one dataset of DreamBooth folders.
    """
    defaults = flag_defaults(args)
    config_path = _arg(args, "dataset_config")
    if config_path:
        from library.data.toml_config import load_dataset_config

        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if _arg(args, n)]
        if ignored:
            print(f"note: {', '.join(ignored)} ignored because --dataset_config is given "
                  f"(the folders come from {config_path}).", flush=True)
        return check_mask_sources(load_dataset_config(config_path, defaults), args, config_path)

    train_dir = _arg(args, "train_data_dir")
    in_json = _arg(args, "in_json")
    if in_json:
        return check_mask_sources([finetune_config(args, defaults, train_dir, in_json)], args)
    if not train_dir:
        raise UserError("no training images given: neither --train_data_dir nor --dataset_config is set.",
                        fix="pass --train_data_dir FOLDER (holding subfolders like 10_dog) or "
                            "--dataset_config FILE.toml.")
    subsets = dreambooth_subsets(train_dir, False, defaults)
    subsets += dreambooth_subsets(_arg(args, "reg_data_dir"), True, defaults)
    config = DatasetConfig(subsets=subsets, source="--train_data_dir", train_data_dir=str(train_dir),
                           reg_data_dir=_arg(args, "reg_data_dir"), **_dataset_kwargs(defaults))
    check_dataset_config(config)
    return check_mask_sources([config], args)


def check_mask_sources(configs: list[DatasetConfig], args, path=None) -> list[DatasetConfig]:
    """kohya's rules for loss masks, checked before any image is read: mask images only with
    --masked_loss, --masked_loss only with a mask source, and one source per dataset (a batch comes
    from one dataset and carries one kind of mask)."""
    masked_loss = bool(_arg(args, "masked_loss", False))
    subsets = [s for c in configs for s in c.subsets]
    with_dir = [s for s in subsets if s.conditioning_data_dir]
    if with_dir and not masked_loss:
        raise UserError(f"conditioning_data_dir is set for {with_dir[0].name} in {path}, but mask images are "
                        "only used with --masked_loss.", path=path,
                        fix="add --masked_loss, or remove conditioning_data_dir from the dataset config.")
    if masked_loss and not any(s.alpha_mask or s.conditioning_data_dir for s in subsets):
        raise UserError("--masked_loss needs masks, but no dataset has any.", path=path,
                        fix="add --alpha_mask (masks from the images' transparency) or --conditioning_data_dir "
                            "FOLDER (a mask image per training image, same file name; white = train), or set "
                            "alpha_mask / conditioning_data_dir in the dataset config; or drop --masked_loss.")
    for i, config in enumerate(configs, 1):
        alpha = [s.name for s in config.subsets if s.alpha_mask]
        folders = [s.name for s in config.subsets if s.conditioning_data_dir]
        if alpha and folders:
            raise UserError(f"dataset #{i} ({config.source}) takes masks both from alpha channels ({', '.join(alpha)}) "
                            f"and from mask images ({', '.join(folders)}); a dataset uses one kind.", path=path,
                            fix="use either --alpha_mask or --conditioning_data_dir, or put the subsets in "
                                "separate [[datasets]] of the dataset config.")
    return configs


def finetune_config(args, defaults: dict, train_dir: str | None, in_json: str) -> DatasetConfig:
    """kohya's fine-tuning mode: --in_json metadata, images in --train_data_dir, no reg images."""
    if _arg(args, "reg_data_dir"):
        print("note: --reg_data_dir is ignored with --in_json (kohya's fine-tuning datasets have no "
              "regularization images).", flush=True)
    values = dict(defaults, image_dir=str(train_dir) if train_dir else None, metadata_file=str(in_json))
    config = DatasetConfig(subsets=[SubsetConfig(**_subset_kwargs(values))], source="--in_json",
                           **_dataset_kwargs(defaults))
    check_dataset_config(config)
    return config


def check_dataset_config(config: DatasetConfig, path=None) -> None:
    """Reject settings that cannot work, before any image is read."""
    where = f"in {path}" if path else "on the command line"
    if config.batch_size < 1:
        raise UserError(f"batch size must be at least 1 ({where}); got {config.batch_size}.", path=path,
                        fix="set --train_batch_size (or batch_size in the dataset config) to 1 or more.")
    for sub in config.subsets:
        if sub.num_repeats < 1:
            raise UserError(f"num_repeats must be at least 1 for {sub.image_dir} ({where}).", path=path,
                            fix="set num_repeats to 1 or more.")
        if sub.keep_tokens < 0:
            raise UserError(f"keep_tokens cannot be negative ({where}).", path=path,
                            fix="set keep_tokens to 0 or more.")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(sub, key) <= 1.0:
                raise UserError(f"{key} must be between 0 and 1 ({where}); got {getattr(sub, key)}.",
                                path=path, fix=f"set {key} to a value from 0 (off) to 1.")
        if sub.caption_dropout_every_n_epochs < 0:
            raise UserError(f"caption_dropout_every_n_epochs cannot be negative ({where}).", path=path,
                            fix="set it to 0 (off) or N to drop all captions every N-th epoch.")
        if not sub.caption_separator:
            raise UserError(f"caption_separator cannot be empty ({where}).", path=path,
                            fix="leave it out (kohya's default is a comma) or give a separator.")
    if not config.enable_bucket:
        return
    steps, lo, hi = config.bucket_reso_steps, config.min_bucket_reso, config.max_bucket_reso
    if steps < 8 or steps % 8:
        raise UserError(f"bucket_reso_steps must be a multiple of 8 ({where}); got {steps}.", path=path,
                        fix="use --bucket_reso_steps 64 (kohya's default) or another multiple of 8.")
    w, h = config.resolution
    if lo > min(w, h) or hi < max(w, h):
        raise UserError(
            f"the bucket range {lo}..{hi} must contain the resolution {w},{h} ({where}).", path=path,
            fix="lower --min_bucket_reso to at most the smaller side of --resolution and raise "
                "--max_bucket_reso to at least its larger side.")

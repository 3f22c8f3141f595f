"""The small hand-kept part of the forms: section order, which options are common (the rest go
under "Advanced"), which are paths, when an option is irrelevant, and what a run needs.

Everything else (names, types, defaults, choices, help) comes from the scripts' parsers, so an
option missing here still gets a widget: in its argparse group's section, under Advanced.
"""
from __future__ import annotations

# argparse group title -> (section title, common options in display order). Groups come from
# library/args.py and are shared by all training scripts.
SECTIONS: dict[str, tuple[str, list[str]]] = {
    "model": ("Model", ["pretrained_model_name_or_path", "vae", "v2", "v_parameterization", "clip_skip"]),
    "dataset": ("Dataset", ["train_data_dir", "reg_data_dir", "dataset_config", "resolution",
                            "caption_extension", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                            "bucket_reso_steps", "bucket_no_upscale",
                            "cache_latents", "shuffle_caption", "keep_tokens", "flip_aug"]),
    "network": ("Network", ["network_module", "network_dim", "network_alpha", "network_args", "unet_lr",
                            "text_encoder_lr", "network_weights", "dim_from_weights",
                            "network_train_unet_only", "network_train_text_encoder_only"]),
    "training": ("Training", ["output_dir", "output_name", "max_train_steps", "max_train_epochs",
                              "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "seed",
                              "gradient_checkpointing", "full_fp16", "full_bf16"]),
    "optimizer": ("Optimizer", ["optimizer_type", "learning_rate", "lr_scheduler", "lr_warmup_steps",
                                "lr_scheduler_num_cycles", "lr_scheduler_power", "optimizer_args"]),
    "saving": ("Saving", ["save_model_as", "save_precision", "save_every_n_epochs", "save_every_n_steps",
                          "save_last_n_epochs", "save_last_n_steps", "save_state", "resume"]),
    "sampling": ("Sample images", ["sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
                                   "sample_sampler", "sample_at_first"]),
    "logging": ("Logging", ["logging_dir", "log_with"]),
    "config": ("Config", ["debug"]),
}
# argparse's own group names, as section titles
GROUP_TITLES = {"positional arguments": "Inputs", "options": "Options"}
SECTION_ORDER = ["positional arguments", "model", "dataset", "network", "training", "optimizer", "saving",
                 "sampling", "logging"]
LAST_SECTIONS = ["config"]   # after the script's own groups

# Shown only when the condition holds (or when the option itself holds a non-default value, so a
# set value is never invisible). Conditions: (field, "in"|"not in", {values}), (field, "set"),
# (field, True); a list of conditions means any of them.
SHOW_IF: dict[str, object] = {
    "min_bucket_reso": ("enable_bucket", True),
    "max_bucket_reso": ("enable_bucket", True),
    "bucket_reso_steps": ("enable_bucket", True),
    "bucket_no_upscale": ("enable_bucket", True),
    "keep_tokens": ("shuffle_caption", True),
    "lr_warmup_steps": ("lr_scheduler", "not in", {"constant"}),
    "lr_scheduler_num_cycles": ("lr_scheduler", "in", {"cosine_with_restarts", "cosine_with_min_lr",
                                                      "warmup_stable_decay"}),
    "lr_scheduler_power": ("lr_scheduler", "in", {"polynomial"}),
    "lr_scheduler_timescale": ("lr_scheduler", "in", {"inverse_sqrt"}),
    "lr_scheduler_min_lr_ratio": ("lr_scheduler", "in", {"cosine_with_min_lr", "warmup_stable_decay"}),
    "lr_decay_steps": ("lr_scheduler", "in", {"warmup_stable_decay"}),
    "full_fp16": ("mixed_precision", "in", {"fp16"}),
    "full_bf16": ("mixed_precision", "in", {"bf16"}),
    "no_half_vae": ("mixed_precision", "not in", {"no"}),
    "sample_every_n_steps": ("sample_prompts", "set"),
    "sample_every_n_epochs": ("sample_prompts", "set"),
    "sample_at_first": ("sample_prompts", "set"),
    "sample_sampler": ("sample_prompts", "set"),
    "save_last_n_epochs": ("save_every_n_epochs", "set"),
    "save_last_n_steps": ("save_every_n_steps", "set"),
    "dim_from_weights": ("network_weights", "set"),
    "log_prefix": ("logging_dir", "set"),
    "log_tracker_name": ("logging_dir", "set"),
    "vae_batch_size": [("cache_latents", True), ("cache_latents_to_disk", True)],
}

# Path options: "file", "dir", "file_or_dir", "files" (several inputs), "save_file", "save_dir".
# Inputs must exist; outputs must be writable. Options not listed are guessed by name (path_kind).
PATHS: dict[str, str] = {
    "pretrained_model_name_or_path": "file_or_dir",
    "vae": "file_or_dir",
    "train_data_dir": "dir",
    "reg_data_dir": "dir",
    "dataset_config": "file",
    "network_weights": "file",
    "resume": "dir",
    "sample_prompts": "file",
    "output_dir": "save_dir",
    "logging_dir": "save_dir",
    "tokenizer_cache_dir": "dir",
    "controlnet": "file_or_dir",
    "control_image": "files",
}

# The user's own files: loading a preset that does not set them, or Defaults, keeps them.
KEEP_ON_PRESET = ["pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "dataset_config",
                  "output_dir", "output_name", "logging_dir", "sample_prompts"]

NOT_PATHS = {"output_name", "save_model_as", "network_module", "log_prefix", "log_tracker_name",
             "caption_extension", "save_precision", "optimizer_type", "log_with", "output_config"}

# What a user reads beside the widget (kohya_ss's wording where it has one); the flag itself is in
# the tooltip and the command. Options not listed get their name with spaces ("Max train steps").
LABELS: dict[str, str] = {
    "pretrained_model_name_or_path": "Base model",
    "ckpt": "Base model",
    "vae": "VAE",
    "v2": "SD 2.x model",
    "v_parameterization": "v-prediction",
    "clip_skip": "CLIP skip",
    "train_data_dir": "Training images folder",
    "reg_data_dir": "Regularisation images folder",
    "dataset_config": "Dataset config (TOML)",
    "resolution": "Resolution (W,H)",
    "caption_extension": "Caption file extension",
    "enable_bucket": "Aspect-ratio buckets",
    "min_bucket_reso": "Min bucket resolution",
    "max_bucket_reso": "Max bucket resolution",
    "cache_latents": "Cache latents",
    "cache_latents_to_disk": "Cache latents to disk",
    "shuffle_caption": "Shuffle caption tags",
    "keep_tokens": "Keep first N tags",
    "flip_aug": "Flip images (augmentation)",
    "network_module": "Network type",
    "network_dim": "Network rank (dim)",
    "network_alpha": "Network alpha",
    "network_args": "Network arguments",
    "network_weights": "Start from weights",
    "unet_lr": "U-Net learning rate",
    "text_encoder_lr": "Text encoder learning rate",
    "network_train_unet_only": "Train U-Net only",
    "network_train_text_encoder_only": "Train text encoder only",
    "output_dir": "Output folder",
    "output_name": "Output name",
    "max_train_steps": "Max training steps",
    "max_train_epochs": "Max training epochs",
    "train_batch_size": "Batch size",
    "gradient_accumulation_steps": "Gradient accumulation steps",
    "mixed_precision": "Mixed precision",
    "gradient_checkpointing": "Gradient checkpointing",
    "full_fp16": "Full fp16 training",
    "full_bf16": "Full bf16 training",
    "optimizer_type": "Optimizer",
    "optimizer_args": "Optimizer arguments",
    "learning_rate": "Learning rate",
    "lr_scheduler": "LR scheduler",
    "lr_warmup_steps": "LR warmup steps",
    "lr_scheduler_num_cycles": "LR restarts (cycles)",
    "lr_scheduler_power": "LR polynomial power",
    "save_model_as": "Save format",
    "save_precision": "Save precision",
    "save_every_n_epochs": "Save every N epochs",
    "save_every_n_steps": "Save every N steps",
    "save_last_n_epochs": "Keep last N epoch saves",
    "save_last_n_steps": "Keep last N step saves",
    "save_state": "Save training state",
    "resume": "Resume from state",
    "sample_prompts": "Sample prompts file",
    "sample_every_n_steps": "Sample every N steps",
    "sample_every_n_epochs": "Sample every N epochs",
    "sample_sampler": "Sampler",
    "sample_at_first": "Sample before training",
    "logging_dir": "Log folder",
    "log_with": "Log with",
    "max_data_loader_n_workers": "Data loader workers",
    "seed": "Seed",
    "outdir": "Output folder",
    "controlnet": "ControlNet",
    "control_image": "Control image(s)",
    "from_file": "Prompts file",
    "sd_model": "Base model (optional)",
    "models": "LoRA files",
    "save_to": "Save to",
}


ACRONYMS = {"sd": "SD", "lr": "LR", "vae": "VAE", "ema": "EMA", "cfg": "CFG", "te": "TE", "unet": "U-Net",
            "lora": "LoRA", "ddp": "DDP", "snr": "SNR", "fp16": "fp16", "bf16": "bf16", "gpu": "GPU", "cpu": "CPU",
            "svd": "SVD", "ckpt": "checkpoint", "reso": "resolution", "dir": "folder", "n": "N", "id": "ID"}


def label_of(dest: str) -> str:
    """The readable label: LABELS, else the name in words ("sd_model" -> "SD model")."""
    if dest in LABELS:
        return LABELS[dest]
    words = [ACRONYMS.get(w, w) for w in dest.split("_") if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


# Free-text options with usual values: an editable dropdown (any other value can still be typed).
SUGGESTIONS: dict[str, list[str]] = {
    "optimizer_type": ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Prodigy",
                       "DAdaptAdam", "Adafactor"],
    "network_module": ["networks.lora", "lycoris.kohya"],
}
# LyCORIS algorithms (network_args "algo=..."), offered as a dropdown when the module is LyCORIS.
LYCORIS_ALGOS = ["lora", "locon", "loha", "lokr", "dora"]


def is_lycoris(module) -> bool:
    return "lycoris" in str(module or "").lower()


# File dialog filters by the kind of file an option holds (the first is the default filter).
MODEL_TYPES = [("Model files", "*.safetensors *.ckpt *.pt *.bin"), ("All files", "*")]
FILE_TYPES: dict[str, list[tuple[str, str]]] = {
    "dataset_config": [("TOML", "*.toml"), ("All files", "*")],
    "sample_prompts": [("Prompt files", "*.txt *.toml *.json"), ("All files", "*")],
    "from_file": [("Text", "*.txt"), ("All files", "*")],
    "control_image": [("Images", "*.png *.jpg *.jpeg *.webp *.bmp"), ("All files", "*")],
}


def file_types(dest: str) -> list[tuple[str, str]]:
    if dest in FILE_TYPES:
        return FILE_TYPES[dest]
    name = dest.lower()
    if any(w in name for w in ("model", "ckpt", "weights", "vae", "controlnet", "lora", "network")):
        return MODEL_TYPES
    if "config" in name or "toml" in name:
        return FILE_TYPES["dataset_config"]
    if "image" in name:
        return FILE_TYPES["control_image"]
    return [("All files", "*")]


# Where a run writes images to show in the samples pane: (option, subfolder).
IMAGE_DIRS = [("output_dir", "sample"), ("outdir", ""), ("save_dir", "samples")]
# Where a run writes TensorBoard logs.
LOG_DIRS = ["logging_dir", "log_dir"]

# What a run cannot do without (beyond argparse's required=True). A tuple means one of them.
REQUIRED: dict[str, list] = {
    "train": ["pretrained_model_name_or_path", "output_dir", ("train_data_dir", "dataset_config")],
}

def section_of(group_title: str, dests: list[str] | None = None) -> tuple[str, list[str] | None]:
    """(title, common options) for an argparse group. None: show all its options (a group the
    layout does not know). A known title whose first common option is missing is another
    script's group of that name (e.g. a non-diffusion "model" group): all of it is shown."""
    key = (group_title or "options").lower()
    title = (group_title or "Options")
    title = title[0].upper() + title[1:]
    if key in GROUP_TITLES:
        return GROUP_TITLES[key], None
    if key in SECTIONS:
        known_title, common = SECTIONS[key]
        if dests is None or not common or common[0] in dests:
            return known_title, common
        return known_title, None
    return title, None


def section_keys(groups_in_parser_order: list[str]) -> list[str]:
    """Sections in display order: known ones first, then the script's own, config last."""
    keys = [g.lower() for g in groups_in_parser_order]
    ordered = [k for k in SECTION_ORDER if k in keys]
    ordered += [k for k in keys if k not in ordered and k not in LAST_SECTIONS]
    ordered += [k for k in LAST_SECTIONS if k in keys]
    return ordered


OUT_WORDS = ("save", "output", "out", "log")


def path_kind(dest: str, list_valued: bool = False) -> str | None:
    """PATHS, else a guess from the name (tools and new scripts need no layout entry)."""
    if dest in PATHS:
        return PATHS[dest]
    if dest in NOT_PATHS:
        return None
    name = dest.lower()
    if name.endswith(("dir", "_folder")):
        return "save_dir" if name.startswith(OUT_WORDS) else "dir"
    if name.startswith(("save_to", "output_file", "out_file")) or name in ("output", "out"):
        return "save_file"
    if list_valued and any(w in name for w in ("model", "ckpt", "weights", "file", "path")):
        return "files"
    if any(w in name for w in ("model", "ckpt", "name_or_path")):
        return "file_or_dir"   # a checkpoint file or a diffusers folder
    if any(w in name for w in ("weights", "file", "path", "json", "listing", "config")):
        return "file"
    return None


SECRET_WORDS = ("password", "secret", "apikey")


def is_secret(dest: str) -> bool:
    """Shown masked in the form (it is still written to the preset, as the script needs it).
    Whole words only: `hf_token` and `wandb_api_key` are secrets, `keep_tokens` and
    `max_token_length` are not."""
    words = dest.lower().split("_")
    joined = "_".join(words)
    return any(w in words for w in SECRET_WORDS) or words[-1] == "token" or joined.endswith("api_key")


def required_for(kind: str, dests: set[str]) -> list:
    """The REQUIRED entries that apply to a script with these options."""
    out = []
    for item in REQUIRED.get(kind, []):
        names = item if isinstance(item, tuple) else (item,)
        if all(n in dests for n in names):
            out.append(item)
    return out


def condition_holds(cond, get) -> bool:
    """Evaluate a SHOW_IF condition; `get(dest)` returns the field's current value (or raises
    KeyError when the script has no such option, which makes the condition not apply)."""
    if isinstance(cond, list):
        return any(condition_holds(c, get) for c in cond)
    try:
        current = get(cond[0])
    except KeyError:
        return True
    if cond[1] is True:
        return bool(current)
    if cond[1] == "set":
        return current not in (None, "", [], False)
    if cond[1] == "in":
        return current in cond[2]
    if cond[1] == "not in":
        return current not in cond[2]
    raise ValueError(f"bad SHOW_IF condition {cond!r}")

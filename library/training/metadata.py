"""kohya's `ss_*` training metadata and the model hashes WebUI shows.

All values are strings; JSON-valued keys hold valid JSON (WebUI's metadata editor breaks on bad JSON).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=8)
def legacy_model_hash(path: str) -> str:
    """WebUI's old short hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


@lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_hashing: dict = {}  # path -> Future of file_sha256, from prefetch_model_hashes
_hash_pool = None


def prefetch_model_hashes(*paths) -> None:
    """Start the sha256 of single-file checkpoints in a background thread (hashlib releases the GIL),
    so that hashing a multi-GB base overlaps model loading and latent caching instead of delaying
    the first step (measured: 11 s for a 2 GB file on a shared 2-core box)."""
    global _hash_pool
    from concurrent.futures import ThreadPoolExecutor

    for path in paths:
        if path and os.path.isfile(path) and str(path) not in _hashing:
            if _hash_pool is None:
                _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
            _hashing[str(path)] = _hash_pool.submit(file_sha256, str(path))


def model_hashes(path: str | None, prefix: str) -> dict[str, str]:
    """ss_sd_model_hash / ss_new_sd_model_hash (or ss_vae_*) for a single file; nothing for folders."""
    if not path or not os.path.isfile(path):
        return {}
    pending = _hashing.pop(str(path), None)
    sha256 = pending.result() if pending is not None else file_sha256(str(path))
    return {f"ss_{prefix}_hash": legacy_model_hash(str(path)), f"ss_new_{prefix}_hash": sha256}

MINIMUM_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2",
                "ss_base_model_version"}


def base_model_version(v2: bool, v_parameterization: bool) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2, and "_v" appended for v-prediction (sd_v2_v
    for SD2 768-v). WebUI files a LoRA under SD2 by ss_v2 == "True"."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def modelspec_architecture(v2: bool, v_parameterization: bool) -> str:
    """The ModelSpec architecture kohya writes: SD2 is split into 512 (epsilon) and 768-v."""
    if not v2:
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"


def _arg_text(value) -> str:
    """A --network_args value as the user wrote it (kohya stores the strings): (1, 2) -> "1,2"."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _s(value) -> str:
    return "None" if value is None else str(value)


def training_metadata(args, *, group_meta: dict, optimizer_desc: str, max_train_steps: int,
                      num_epochs: int, num_batches_per_epoch: int, network_args: dict,
                      mixed_precision: str, num_processes: int = 1) -> dict[str, str]:
    """The metadata written into every saved file of a run (ss_epoch/ss_steps are added per save)."""
    res = args.resolution or (512, 512)
    meta = {
        "ss_session_id": str(uuid.uuid4().int % (1 << 31)),
        "ss_training_started_at": f"{time.time():.3f}",
        "ss_output_name": args.output_name,
        "ss_learning_rate": _s(args.learning_rate),
        "ss_text_encoder_lr": _s(args.text_encoder_lr),
        "ss_unet_lr": _s(args.unet_lr),
        "ss_num_epochs": _s(num_epochs),
        "ss_num_batches_per_epoch": _s(num_batches_per_epoch),
        "ss_gradient_checkpointing": _s(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(args.gradient_accumulation_steps),
        "ss_max_train_steps": _s(max_train_steps),
        "ss_lr_warmup_steps": _s(args.lr_warmup_steps),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": _s(args.network_dim),
        "ss_network_alpha": _s(args.network_alpha),
        "ss_network_dropout": _s(args.network_dropout),
        "ss_scale_weight_norms": _s(getattr(args, "scale_weight_norms", None)),
        "ss_network_args": json.dumps({k: _arg_text(v) for k, v in network_args.items()}) if network_args else "None",
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": _s(args.full_fp16),
        "ss_full_bf16": _s(args.full_bf16),
        "ss_v2": _s(bool(args.v2)),
        "ss_base_model_version": base_model_version(args.v2, args.v_parameterization),
        "ss_clip_skip": _s(args.clip_skip),
        "ss_max_token_length": _s(args.max_token_length),
        "ss_cache_latents": _s(args.cache_latents or args.cache_latents_to_disk),
        "ss_seed": _s(args.seed),
        "ss_noise_offset": _s(args.noise_offset),
        "ss_min_timestep": _s(args.min_timestep),
        "ss_max_timestep": _s(args.max_timestep),
        # the loss/noise options, under the keys kohya writes (absent flags read as off)
        "ss_noise_offset_random_strength": _s(getattr(args, "noise_offset_random_strength", False)),
        "ss_adaptive_noise_scale": _s(getattr(args, "adaptive_noise_scale", None)),
        "ss_multires_noise_iterations": _s(getattr(args, "multires_noise_iterations", None)),
        "ss_multires_noise_discount": _s(getattr(args, "multires_noise_discount", 0.3)),
        "ss_ip_noise_gamma": _s(getattr(args, "ip_noise_gamma", None)),
        "ss_ip_noise_gamma_random_strength": _s(getattr(args, "ip_noise_gamma_random_strength", False)),
        "ss_zero_terminal_snr": _s(getattr(args, "zero_terminal_snr", False)),
        "ss_min_snr_gamma": _s(getattr(args, "min_snr_gamma", None)),
        "ss_debiased_estimation": _s(bool(getattr(args, "debiased_estimation_loss", False))),
        "ss_loss_type": _s(getattr(args, "loss_type", "l2")),
        "ss_huber_schedule": _s(getattr(args, "huber_schedule", "snr")),
        "ss_huber_c": _s(getattr(args, "huber_c", 0.1)),
        "ss_huber_scale": _s(getattr(args, "huber_scale", 1.0)),
        "ss_prior_loss_weight": _s(args.prior_loss_weight),
        "ss_max_grad_norm": _s(args.max_grad_norm),
        "ss_optimizer": optimizer_desc,
        "ss_training_comment": _s(args.training_comment),
        "ss_batch_size_per_device": _s(args.train_batch_size),
        "ss_total_batch_size": _s(args.train_batch_size * num_processes * args.gradient_accumulation_steps),
        "ss_sd_model_name": os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)),
        "ss_vae_name": os.path.basename(os.path.normpath(args.vae)) if args.vae else "None",
        "ss_v_parameterization": _s(args.v_parameterization),
        # ModelSpec keys that WebUI extensions and ComfyUI read to describe the file
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(args.v2, args.v_parameterization) + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        **modelspec_from_flags(args),
    }
    meta.update({k: _s(v) for k, v in group_meta.items()})
    meta.update(model_hashes(args.pretrained_model_name_or_path, "sd_model"))
    meta.update(model_hashes(args.vae, "vae"))
    return meta


MODELSPEC_FLAGS = ("title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint", "thumbnail")


def modelspec_from_flags(args) -> dict[str, str]:
    """modelspec.* from --metadata_<name> (kohya's get_sai_model_spec), with kohya's encoder_layer
    (--clip_skip) and timestep_range (--min/max_timestep). A --metadata_thumbnail file becomes a data:
    URL; a missing one is an error before training (kohya skips it with a warning)."""
    out = {}
    for name in MODELSPEC_FLAGS:
        value = getattr(args, f"metadata_{name}", None)
        if value is not None:
            out[f"modelspec.{name}"] = thumbnail_data_url(value) if name == "thumbnail" else str(value)
    if getattr(args, "clip_skip", None) is not None:
        out["modelspec.encoder_layer"] = str(args.clip_skip)
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if low is not None or high is not None:
        out["modelspec.timestep_range"] = f"{low if low is not None else 0},{high if high is not None else 1000}"
    return out


def thumbnail_data_url(value: str) -> str:
    import base64
    import mimetypes

    from library.errors import UserError

    if value.startswith("data:"):
        return value
    path = Path(value)
    if not path.is_file():
        raise UserError("the --metadata_thumbnail file does not exist.", path=path,
                        fix="pass an image file (or a data: URL), or leave the flag out.")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def for_save(meta: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    out = dict(meta)
    out["ss_epoch"] = str(epoch)
    out["ss_steps"] = str(step)
    out["ss_training_finished_at"] = f"{time.time():.3f}"
    out["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})

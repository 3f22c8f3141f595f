"""Load a Stable Diffusion 1.x / 2.x model from a local diffusers folder or a single-file checkpoint.

Single files are read once (memory-mapped for .safetensors) and their tensors are assigned into
models built on the meta device, so nothing is randomly initialised and no weight is held twice.
Architectures are inferred from tensor shapes (see arch.py), and every mismatch between file and
model is a UserError naming the file rather than a silently half-initialised model.

SD1 or SD2 is read from the weights by the model-family registry (library.models.families: SD2.x
has an OpenCLIP text encoder and Linear attention projections);
a `--v2` flag that says otherwise only gets a warning, since the weights cannot be loaded any
other way. v-prediction (SD2 768-v) is not visible in the weights: it comes from
`v_parameterization` (--v_parameterization), or else from a diffusers folder's scheduler config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models import arch, convert, families
from library.models.checkpoint_io import check_exists, load_state_dict


@dataclass
class SDModel:
    tokenizer: Any
    text_encoder: Any  # transformers CLIPTextModel
    vae: Any  # diffusers AutoencoderKL
    unet: Any  # diffusers UNet2DConditionModel
    noise_scheduler: Any  # diffusers DDPMScheduler
    v2: bool
    model_path: str
    model_name: str
    family: str = ""  # library.models.families name, read from the weights (default: from v2)

    def __post_init__(self):
        self.family = self.family or families.for_v2(self.v2).name


def load_sd_model(path, vae_path=None, v2: bool = False, dtype: torch.dtype = torch.float32,
                  device="cpu", v_parameterization: bool | None = None,
                  vae_dtype: torch.dtype | None = None) -> SDModel:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler.

    `path`: a diffusers folder, or a single-file checkpoint in the original SD layout
    (.safetensors, or .ckpt/.pt/.bin read with torch's weights-only loader). `vae_path` replaces
    the model's VAE (a diffusers VAE folder or a single-file VAE). `v2` is what the user said
    (--v2); the returned `SDModel.v2` is what the weights are. `v_parameterization` True/False sets
    the scheduler's prediction type (v_prediction/epsilon); None keeps the folder's. `dtype` is the
    UNet's and text encoder's, `vae_dtype` the VAE's (default: `dtype`): each tensor is cast once, from
    the file's dtype straight to the one it is trained in (an fp16 file read as fp32 and then cast to
    bf16 took two passes over 3.4 GB).
    """
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    path = check_exists(path, "model")
    if vae_path is not None:
        check_exists(vae_path, "VAE", flag="the VAE path (--vae)")
    folder = path if path.is_dir() else None
    # The cheap parts first, so that a broken tokenizer or scheduler fails before the big reads.
    scheduler = make_noise_scheduler(folder, v_parameterization)
    if folder is not None:
        family = families.detect_folder(folder)
        is_v2 = family.v2
        tokenizer = _tokenizer(folder, is_v2)
        unet, vae, text_encoder = _load_folder(path, dtype, vae_dtype, need_vae=vae_path is None)
    else:
        unet, vae, text_encoder, family = _load_single_file(path, dtype, vae_dtype, need_vae=vae_path is None)
        is_v2 = family.v2
        tokenizer = _tokenizer(None, is_v2)
    _check_v2_flag(path, v2, is_v2)
    if vae_path is not None:
        vae = load_vae(vae_path, vae_dtype)
    unet, vae, text_encoder = (m.to(device=device).eval() for m in (unet, vae, text_encoder))
    return SDModel(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                   noise_scheduler=scheduler, v2=is_v2, model_path=str(path),
                   model_name=path.name if folder is not None else path.stem, family=family.name)


def _check_v2_flag(path: Path, said_v2: bool, is_v2: bool) -> None:
    from library.logs import warn_once

    if is_v2 and not said_v2:
        warn_once(f"{path} is a Stable Diffusion 2.x model (OpenCLIP text encoder), so it is loaded and trained "
                  "as SD2.x. Pass --v2 to say so (and --v_parameterization for 768-v models such as SD2.1-768; "
                  "the weights cannot tell).")
    elif said_v2 and not is_v2:
        warn_once(f"--v2 was given, but {path} is a Stable Diffusion 1.x model (CLIP ViT-L text encoder), so "
                  "it is loaded and trained as SD1.x. Leave out --v2 for this model.")


def make_noise_scheduler(folder: Path | None = None, v_parameterization: bool | None = None):
    """The DDPM scheduler used for training: SD1.5's schedule (also SD2's), or the folder's own betas.

    Only the fields that define the noise schedule are taken from a folder: real SD folders ship a
    PNDM inference config, whose other settings (e.g. missing clip_sample, which DDPM would turn
    on) are meaningless for training. `v_parameterization` True/False overrides prediction_type.
    """
    from diffusers import DDPMScheduler

    cfg = arch.shipped_config("scheduler")
    theirs = folder / "scheduler" / "scheduler_config.json" if folder else None
    if theirs is not None and theirs.is_file():
        try:
            data = json.loads(theirs.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the scheduler config {theirs} ({err}).", path=theirs,
                            fix="repair the JSON file or delete it to use SD1.5's schedule.") from None
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "prediction_type"):
            if key in data:
                cfg[key] = data[key]
    if v_parameterization is not None:
        wanted = "v_prediction" if v_parameterization else "epsilon"
        if theirs is not None and theirs.is_file() and cfg["prediction_type"] != wanted:
            from library.logs import warn_once

            hint = ("pass --v_parameterization if this is a v-prediction model (SD2 768-v)"
                    if cfg["prediction_type"] == "v_prediction" else "leave out --v_parameterization unless you "
                    "mean to train this model to predict v")
            warn_once(f"{theirs} says prediction_type={cfg['prediction_type']}, but training uses {wanted}; {hint}.")
        cfg["prediction_type"] = wanted
    return DDPMScheduler.from_config(cfg)


def load_vae(path, dtype: torch.dtype = torch.float32):
    """A VAE from a diffusers folder (with config.json, or with a vae/ subfolder) or a single file."""
    path = check_exists(path, "VAE", flag="the VAE path (--vae)")
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise UserError(
                f"{path} is not a diffusers VAE folder: it has no config.json (nor vae/config.json).",
                path=path, fix="pass a VAE .safetensors file, or a folder holding config.json and "
                               "diffusion_pytorch_model.safetensors.")
        from diffusers import AutoencoderKL

        return _from_pretrained(AutoencoderKL, folder, dtype)
    return vae_from_state_dict(load_state_dict(path), path, dtype)


def vae_from_state_dict(sd: dict, path, dtype: torch.dtype = torch.float32):
    """A VAE from LDM keys (with or without `first_stage_model.`), or diffusers keys."""
    from diffusers import AutoencoderKL

    bare = convert.strip_vae_prefix(sd)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in bare:
        bare = convert.vae_to_ldm(bare, prefix="")  # diffusers layout: go via LDM to infer the config
    if "encoder.conv_in.weight" not in bare:
        raise _wrong_architecture(path, "it has no VAE weights (no first_stage_model.* or encoder.*/"
                                        "decoder.* keys)", sd)
    try:
        cfg = arch.infer_vae_config(bare)
        vae_sd = convert.vae_to_diffusers(bare, cfg)
    except (KeyError, IndexError) as err:
        raise _wrong_architecture(path, f"its VAE keys do not match the SD VAE layout (missing {err})", sd)
    return _build(lambda: AutoencoderKL(**arch.model_kwargs(cfg)), vae_sd, path, "VAE", dtype)


# ----------------------------------------------------------------------------- single files

def _load_single_file(path: Path, dtype, vae_dtype, need_vae: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Training uses the non-EMA weights (as diffusers' converter does by default); a VAE given
    # separately makes the file's own VAE unneeded.
    skip = ("model_ema.",) + (() if need_vae else (arch.VAE_PREFIX,))
    sd = load_state_dict(path, skip_prefixes=skip)
    family = families.detect_state_dict(sd, path)  # or a UserError saying what the file is
    try:
        unet_cfg = arch.infer_unet_config(sd, arch.UNET_PREFIX)
        unet_sd = convert.unet_to_diffusers(sd, unet_cfg)
    except (KeyError, IndexError) as err:
        raise _wrong_architecture(path, f"its UNet keys do not match the SD1.x/SD2.x layout (missing {err})", sd)
    v2 = family.v2
    if v2 and convert.open_clip_layer_count(sd) < 2:
        raise _wrong_architecture(path, "its OpenCLIP text encoder (cond_stage_model.model.*) has fewer than 2 "
                                        "layers; SD2.x uses the penultimate one", sd)
    te_sd = convert.open_clip_to_diffusers(sd) if v2 else convert.text_encoder_to_diffusers(sd)
    if "embeddings.token_embedding.weight" not in te_sd:
        where = "cond_stage_model.model.token_embedding" if v2 else "cond_stage_model.transformer.text_model.*"
        raise _wrong_architecture(path, f"it has no complete CLIP text encoder weights ({where})", sd)
    try:
        te_cfg = CLIPTextConfig(**arch.infer_text_encoder_config(te_sd, kind=family.config_kind))
    except (KeyError, IndexError) as err:
        raise _wrong_architecture(path, f"its text encoder keys are incomplete (missing {err})", sd)
    unet = _build(lambda: UNet2DConditionModel(**arch.model_kwargs(unet_cfg)), unet_sd, path, "UNet", dtype)
    text_encoder = _build(lambda: CLIPTextModel(te_cfg), te_sd, path, "text encoder", dtype)
    vae = vae_from_state_dict(sd, path, vae_dtype) if need_vae else None
    return unet, vae, text_encoder, family


def _wrong_architecture(path, reason: str, sd: dict | None = None) -> UserError:
    sample = f" Its first keys: {', '.join(list(sd)[:3])}." if sd else ""
    return UserError(f"cannot use {path} as a Stable Diffusion 1.x/2.x model: {reason}.{sample}", path=path,
                     fix="pass an SD1.x/SD2.x base checkpoint (.safetensors) or a diffusers folder of one.")


def _build(factory, state_dict: dict, path, component: str, dtype):
    """Build a model without initialising weights, check every key and shape, then assign."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers stay real (CLIP's position_ids)
        model = factory()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:3])}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", sorted(wrong))) if items]
        raise UserError(
            f"the {component} weights in {path} do not fit the architecture inferred from the file; "
            + "; ".join(parts) + ".", path=path,
            fix="check that the file is a complete SD1.x/SD2.x checkpoint; re-download it if it was cut short.")
    # Cast tensors rather than the model: diffusers' Module.to(dtype) warns on every call.
    state_dict = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------- diffusers folders

def _load_folder(path: Path, dtype, vae_dtype, need_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    needed = ["unet", "text_encoder"] + (["vae"] if need_vae else [])
    missing = [sub for sub in needed if not (path / sub / "config.json").is_file()]
    if missing:
        raise UserError(
            f"{path} is not a complete diffusers model folder: "
            f"{', '.join(s + '/config.json' for s in missing)} missing.", path=path,
            fix="pass a diffusers folder with unet/, vae/ and text_encoder/ subfolders, or a single-file "
                ".safetensors checkpoint.")
    unet = _from_pretrained(UNet2DConditionModel, path / "unet", dtype)
    text_encoder = _from_pretrained(CLIPTextModel, path / "text_encoder", dtype)
    vae = _from_pretrained(AutoencoderKL, path / "vae", vae_dtype) if need_vae else None
    return unet, vae, text_encoder


def _from_pretrained(cls, folder: Path, dtype):
    if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        raise UserError(f"{folder} has a config.json but no weights (.safetensors or .bin file).",
                        path=folder, fix="copy the folder again; the weight file is missing.")
    dtype_arg = "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          **{dtype_arg: dtype})
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load {folder} ({str(err).strip().splitlines()[0]}).", path=folder,
                        fix="check the folder holds config.json and its weights "
                            "(.safetensors or .bin); copy it again if it is incomplete.") from None
    bad = sorted(info.get("missing_keys", [])) + sorted(info.get("mismatched_keys", []))
    if bad:
        raise UserError(f"the weights in {folder} do not match its config.json ({len(bad)} keys missing or "
                        f"of the wrong shape, e.g. {bad[0]}).", path=folder,
                        fix="use the config.json that came with these weights.")
    return model


def _tokenizer(folder: Path | None, v2: bool = False):
    if folder is not None and (folder / "tokenizer").is_dir():
        from transformers import CLIPTokenizer

        from library.models.tokenizer import match_reference

        try:
            return match_reference(CLIPTokenizer.from_pretrained(str(folder / "tokenizer"),
                                                                 local_files_only=True))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the tokenizer in {folder / 'tokenizer'} ({err}).",
                            path=folder / "tokenizer",
                            fix="delete the tokenizer/ folder to use the built-in CLIP tokenizer.") from None
    from library.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(kind="sd2" if v2 else "sd1")  # SD2 pads with "!", SD1 with <|endoftext|>

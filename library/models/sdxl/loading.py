"""Load an SDXL base model from a single file (original layout) or a diffusers folder, offline.

Single files (.safetensors memory-mapped; .ckpt/.pt through torch's weights-only loader) are
read once and their tensors assigned into models built on the meta device; every mismatch is a
UserError naming the file. What the file is comes from its keys (arch.detect): an SDXL refiner,
an SD1.x/2.x checkpoint or a LoRA each get one error saying what to pass instead.

Both tokenizers are the shipped ones whatever the model holds, as kohya does (it always loads
openai/clip-vit-large-patch14 and laion's bigG tokenizer, with pad id 0 for bigG): see
`load_sdxl_tokenizers`. The training scheduler is SD's DDPM schedule (SDXL's is the same),
v-prediction only with --v_parameterization (SDXL v-pred fine-tunes), as for SD1/2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models.arch import model_kwargs
from library.models.checkpoint_io import check_exists, load_state_dict
from library.models.sdxl import arch, convert

FIX_BASE = ("pass an SDXL base checkpoint (sd_xl_base_1.0.safetensors or a fine-tune of it: Pony, Illustrious, "
            "NoobAI, ...) as a .safetensors file or a diffusers folder.")
FIX_SD12 = ("train SD1.x/SD2.x models with train_network.py (same options); sdxl_train_network.py takes "
            "SDXL base models.")


@dataclass
class SDXLModel:
    tokenizers: tuple  # (CLIP ViT-L, bigG) transformers CLIPTokenizer
    text_encoders: tuple  # (CLIPTextModel, CLIPTextModelWithProjection)
    vae: Any  # diffusers AutoencoderKL, scaling factor 0.13025
    unet: Any  # diffusers UNet2DConditionModel (addition_embed_type "text_time")
    noise_scheduler: Any  # diffusers DDPMScheduler
    model_path: str
    model_name: str


def load_sdxl_tokenizers():
    """(CLIP ViT-L tokenizer padding with <|endoftext|>, bigG tokenizer padding with "!" = id 0).

    Same BPE vocabulary; bigG pads with 0 as open_clip's tokenizer does (and kohya sets
    `pad_token_id = 0` on its bigG tokenizer), which is the shipped "sd2" kind.
    """
    from library.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer("sd1"), load_clip_tokenizer("sd2")


def load_sdxl_model(path, vae_path=None, dtype: torch.dtype = torch.float32, device="cpu",
                    v_parameterization: bool | None = None, vae_dtype: torch.dtype | None = None) -> SDXLModel:
    """Tokenizers, both text encoders, VAE, UNet and the training noise scheduler of an SDXL base.

    `vae_path` (--vae) replaces the model's VAE: a diffusers VAE folder or a single-file VAE; it
    is used with SDXL's scaling factor (0.13025), as kohya does. `dtype` is the UNet's and text
    encoders', `vae_dtype` the VAE's (default `dtype`); each tensor is cast once.
    """
    from library.models.loading import make_noise_scheduler

    vae_dtype = dtype if vae_dtype is None else vae_dtype
    path = check_exists(path, "model")
    if vae_path is not None:
        check_exists(vae_path, "VAE", flag="the VAE path (--vae)")
    folder = path if path.is_dir() else None
    scheduler = make_noise_scheduler(folder, v_parameterization)
    tokenizers = load_sdxl_tokenizers()
    load = _load_folder if folder is not None else _load_single_file
    unet, vae, te1, te2 = load(path, dtype, vae_dtype, need_vae=vae_path is None)
    if vae_path is not None:
        vae = load_sdxl_vae(vae_path, vae_dtype)
    unet, vae, te1, te2 = (m.to(device=device).eval() for m in (unet, vae, te1, te2))
    return SDXLModel(tokenizers=tokenizers, text_encoders=(te1, te2), vae=vae, unet=unet,
                     noise_scheduler=scheduler, model_path=str(path),
                     model_name=path.name if folder is not None else path.stem)


def load_sdxl_vae(path, dtype: torch.dtype = torch.float32):
    """A VAE (--vae) used at SDXL's scaling factor, whatever its config says (as kohya does)."""
    from library.logs import warn_once
    from library.models.loading import load_vae

    vae = load_vae(path, dtype)
    said = vae.config.scaling_factor
    if Path(path).is_dir() and said != arch.VAE_SCALE_FACTOR:
        warn_once(f"the VAE {path} says scaling_factor={said}; SDXL's latents use {arch.VAE_SCALE_FACTOR}, "
                  "which is what training uses (as kohya does).")
    vae.register_to_config(scaling_factor=arch.VAE_SCALE_FACTOR, force_upcast=True)
    return vae


# ----------------------------------------------------------------------------- single files

def _not_sdxl(path, kind: str, sd: dict) -> UserError:
    sample = f" Its first keys: {', '.join(list(sd)[:3])}."
    if kind == arch.SDXL_REFINER:
        return UserError(f"{path} is an SDXL refiner (its only text encoder is OpenCLIP bigG, "
                         "conditioner.embedders.0.model.*): training the refiner is not supported.", path=path,
                         fix=FIX_BASE)
    if kind in (arch.SD1, arch.SD2):
        name = "1.x" if kind == arch.SD1 else "2.x"
        return UserError(f"{path} is a Stable Diffusion {name} checkpoint, not SDXL.", path=path,
                         fix=FIX_SD12)
    if kind == arch.LORA:
        return UserError(f"{path} is a LoRA file, not a base model.", path=path,
                         fix="pass the LoRA with --network_weights and the SDXL base model with "
                             "--pretrained_model_name_or_path.")
    return UserError(f"{path} is not an SDXL checkpoint in the original single-file layout (no "
                     f"conditioner.embedders.* and model.diffusion_model.* keys).{sample}", path=path, fix=FIX_BASE)


def _load_single_file(path: Path, dtype, vae_dtype, need_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models import convert as base_convert

    skip = ("model_ema.",) + (() if need_vae else (arch.VAE_PREFIX,))
    sd = load_state_dict(path, skip_prefixes=skip)
    kind = arch.detect(sd)
    if kind != arch.SDXL_BASE:
        raise _not_sdxl(path, kind, sd)
    te1_sd = convert.text_encoder_1_to_diffusers(sd)
    te2_sd = convert.text_encoder_2_to_diffusers(sd)
    for name, part, key in (("CLIP ViT-L text encoder", te1_sd, "embeddings.token_embedding.weight"),
                            ("OpenCLIP bigG text encoder", te2_sd, "text_projection.weight"),
                            ("OpenCLIP bigG text encoder", te2_sd, "text_model.embeddings.token_embedding.weight")):
        if key not in part:
            raise _incomplete(path, f"it has no complete {name} ({key} is missing)")
    try:
        te1_cfg = CLIPTextConfig(**arch.infer_text_encoder_config(te1_sd))
        te2_cfg = CLIPTextConfig(**arch.infer_text_encoder_2_config(
            {k.removeprefix("text_model."): v for k, v in te2_sd.items()}))
        unet_cfg = arch.infer_unet_config(sd, pooled_dim=te2_cfg.projection_dim)
        unet_sd = convert.unet_to_diffusers(sd, unet_cfg)
    except (KeyError, IndexError) as err:
        raise _incomplete(path, f"its keys do not make a whole SDXL model (missing {err})") from None
    unet = _assign(lambda: UNet2DConditionModel(**model_kwargs(unet_cfg)), unet_sd, path, "UNet", dtype)
    te1 = _assign(lambda: CLIPTextModel(te1_cfg), te1_sd, path, "CLIP ViT-L text encoder", dtype)
    te2 = _assign(lambda: CLIPTextModelWithProjection(te2_cfg), te2_sd, path, "OpenCLIP bigG text encoder", dtype)
    vae = None
    if need_vae:
        bare = base_convert.strip_vae_prefix(sd)
        if "encoder.conv_in.weight" not in bare:
            raise _incomplete(path, "it has no VAE (first_stage_model.*)",
                              fix="pass a VAE with --vae, or a checkpoint that holds its VAE.")
        try:
            vae_cfg = arch.infer_vae_config(bare)
            vae_sd = base_convert.vae_to_diffusers(bare, vae_cfg)
        except (KeyError, IndexError) as err:
            raise _incomplete(path, f"its VAE keys are incomplete (missing {err})") from None
        vae = _assign(lambda: AutoencoderKL(**model_kwargs(vae_cfg)), vae_sd, path, "VAE", vae_dtype)
    return unet, vae, te1, te2


def _incomplete(path, reason: str, fix: str | None = None) -> UserError:
    return UserError(f"cannot load {path} as an SDXL base model: {reason}.", path=path,
                     fix=fix or "the file looks cut short or is not a whole SDXL checkpoint: download or copy it "
                                "again (compare its size with the source), or " + FIX_BASE)


def _assign(factory, state_dict: dict, path, component: str, dtype):
    """Build a model on the meta device, check every key and shape, then assign the tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
                   for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:3])}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise _incomplete(path, f"its {component} weights do not fit the architecture read from the file; "
                          + "; ".join(parts))
    state_dict = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------- diffusers folders

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}).", path=path,
                        fix="repair the JSON file, or copy the model folder again.") from None


def _load_folder(path: Path, dtype, vae_dtype, need_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.models.loading import _from_pretrained

    kind = arch.detect_folder(_read_json(path / "model_index.json"), _read_json(path / "unet" / "config.json"),
                              has_text_encoder=(path / "text_encoder").is_dir())
    if kind == arch.SDXL_REFINER:
        raise UserError(f"{path} is an SDXL refiner (no CLIP ViT-L text_encoder/): training the refiner is not "
                        "supported.", path=path, fix=FIX_BASE)
    if kind in (arch.SD1, arch.SD2):
        name = "1.x" if kind == arch.SD1 else "2.x"
        raise UserError(f"{path} is a Stable Diffusion {name} diffusers folder, not SDXL (no text_encoder_2/, "
                        "no SDXL size embedding in unet/config.json).", path=path, fix=FIX_SD12)
    needed = ["unet", "text_encoder", "text_encoder_2"] + (["vae"] if need_vae else [])
    missing = [sub for sub in needed if not (path / sub / "config.json").is_file()]
    if missing:
        raise UserError(f"{path} is not a complete diffusers SDXL folder: "
                        f"{', '.join(s + '/config.json' for s in missing)} missing.", path=path,
                        fix="pass a diffusers folder with unet/, vae/, text_encoder/ and text_encoder_2/, "
                            "or a single-file .safetensors checkpoint.")
    unet = _from_pretrained(UNet2DConditionModel, path / "unet", dtype)
    te1 = _from_pretrained(CLIPTextModel, path / "text_encoder", dtype)
    te2 = _from_pretrained(CLIPTextModelWithProjection, path / "text_encoder_2", dtype)
    vae = _from_pretrained(AutoencoderKL, path / "vae", vae_dtype) if need_vae else None
    return unet, vae, te1, te2

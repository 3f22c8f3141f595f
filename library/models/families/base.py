"""The model-family interface: everything that differs between model families, in one place.

A family module defines one `ModelFamily` subclass (or instance) and registers it
(library.models.families.register). The contract, field by field:

- name: the registry key ("sd1", "sd2", "sdxl"); title: for messages ("SD1.x").
- v2: kohya's ss_v2 value (True for SD2.x only); config_kind: the shipped configs folder under
  library/models/configs/ (tokenizer, UNet, VAE, text encoder and scheduler configs).
- default_resolution(v_parameterization): the side its base models were trained at.
- matches_state_dict(sd): True when a single-file checkpoint's keys (and shapes) are this family's.
  Exactly one registered family may match a checkpoint; keys of no family get a clear error.
- matches_folder(folder): the same for a diffusers folder (unet/config.json, text_encoder*/).
- load(path, **kwargs): the tokenizer(s), text encoder(s), VAE, UNet and noise scheduler
  (library.models.loading.SDModel or a family's richer model object with the same fields).
- encode_prompts(model, captions, device, clip_skip, max_token_length) -> TextConditioning: the
  prompts as the UNet takes them. One text encoder gives hidden states; a family with two text
  encoders (SDXL) concatenates their hidden states, and puts the pooled output and its extra
  conditions (size / crop ids) into `pooled` and `added_cond`: the trainer passes
  `cond.unet_kwargs(dtype)` to the UNet and never looks inside.
- LoRA naming (kohya): lora_unet_prefix, lora_text_encoder_prefixes (one per text encoder: SD1/2
  "lora_te"; SDXL "lora_te1", "lora_te2"), and the module classes a LoRA targets
  (unet_target_modules, unet_conv_target_modules for LoCon, text_encoder_target_modules);
  lora_module_name(prefix, module_path) gives the name in the file.
- metadata(v_parameterization): the ss_* / modelspec values that name the family in a LoRA file
  (ss_v2, ss_base_model_version, modelspec.architecture without the "/lora" suffix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TextConditioning:
    """What the UNet takes from the prompts: hidden states, and for SDXL-like families the pooled
    text embedding and extra conditions (diffusers' added_cond_kwargs: text_embeds, time_ids)."""
    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    added_cond: dict = field(default_factory=dict)

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments for the diffusers UNet's forward, cast to `dtype`."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        kwargs = {"encoder_hidden_states": cast(self.hidden_states)}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in self.added_cond.items()}
        return kwargs


class ModelFamily:
    """The interface (see the module text for the contract). The defaults here are the single-CLIP
    text path that SD1.x and SD2.x share; a family overrides what differs."""

    name: str = ""
    title: str = ""
    v2: bool = False
    config_kind: str = ""
    # kohya's names, as networks/lora_format.py writes them (a test keeps the two equal; library/models
    # does not import networks/, which imports library/models)
    lora_unet_prefix: str = "lora_unet"
    lora_text_encoder_prefixes: tuple[str, ...] = ("lora_te",)
    unet_target_modules: tuple[str, ...] = ("Transformer2DModel",)
    unet_conv_target_modules: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    text_encoder_target_modules: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2",
                                                    "CLIPMLP")

    def default_resolution(self, v_parameterization: bool = False) -> int:
        return 512

    def matches_state_dict(self, state_dict) -> bool:
        raise NotImplementedError

    def matches_folder(self, folder: Path) -> bool:
        raise NotImplementedError

    def load(self, path, **kwargs):
        """The model (library.models.loading.load_sd_model's keyword arguments)."""
        from library.models.loading import load_sd_model

        return load_sd_model(path, v2=self.v2, **kwargs)

    def encode_prompts(self, model, captions: list[str], device=None, clip_skip: int | None = None,
                       max_token_length: int | None = None, weighted: bool = False) -> TextConditioning:
        """`weighted`: kohya's --weighted_captions, A1111's (word:1.2) in captions."""
        from library.models.text import encode_text

        return TextConditioning(encode_text(model.tokenizer, model.text_encoder, captions, max_token_length,
                                            clip_skip, weighted, device or model.text_encoder.device))

    def lora_module_name(self, prefix: str, module_path: str) -> str:
        """kohya's module name in a LoRA file: prefix + the module path with dots as underscores; a
        CLIP text encoder's paths keep transformers 4's `text_model.` level (WebUI matches only that)."""
        if prefix in self.lora_text_encoder_prefixes and not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        return f"{prefix}_{module_path}".replace(".", "_")

    def base_model_version(self, v_parameterization: bool) -> str:
        raise NotImplementedError

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        raise NotImplementedError

    def metadata(self, v_parameterization: bool) -> dict[str, str]:
        return {"ss_v2": str(self.v2), "ss_base_model_version": self.base_model_version(v_parameterization),
                "modelspec.architecture": self.modelspec_architecture(v_parameterization)}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

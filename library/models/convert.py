"""Key mapping between the original SD single-file layout ("LDM") and diffusers/transformers.

LDM -> diffusers reuses diffusers' own converters for the UNet and VAE (they are what
`from_single_file` runs, so we read files exactly as diffusers does). diffusers -> LDM is ours:
diffusers has no public reverse mapping, and we need it to save what WebUI and ComfyUI load.
The two directions are inverse to each other for every key, so a round trip is exact.

All functions only rename keys (and reshape a few VAE attention weights); tensors are shared,
never copied.
"""
from __future__ import annotations

import math
import re

import torch

from library.models.arch import OPEN_CLIP_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX


# ----------------------------------------------------------------------------- LDM -> diffusers

def unet_to_diffusers(checkpoint: dict, config: dict) -> dict:
    """UNet weights from an LDM checkpoint (`model.diffusion_model.*` keys)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(checkpoint, config)


def strip_vae_prefix(sd: dict) -> dict:
    """The VAE part of a checkpoint with bare `encoder.`/`decoder.` keys.

    Full checkpoints carry `first_stage_model.`; standalone VAE files (sd-vae-ft-mse) do not.
    """
    if any(k.startswith(VAE_PREFIX) for k in sd):
        return {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    return dict(sd)


def vae_to_diffusers(checkpoint: dict, config: dict) -> dict:
    """VAE weights from an LDM checkpoint or a standalone LDM VAE file."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(strip_vae_prefix(checkpoint), config)


def text_encoder_to_diffusers(checkpoint: dict) -> dict:
    """CLIPTextModel weights (transformers 5 names: `embeddings.*`, `encoder.*`, ...).

    diffusers' `convert_ldm_clip_checkpoint` keeps the `text_model.` level, which transformers 5's
    CLIPTextModel no longer has, so we map these keys ourselves. `position_ids` is dropped: it is a
    non-persistent buffer now, and some merged checkpoints carry a corrupted float copy of it.
    """
    out = {}
    for key, value in checkpoint.items():
        if not key.startswith(TEXT_ENCODER_PREFIX):
            continue
        name = key[len(TEXT_ENCODER_PREFIX):].removeprefix("text_model.")
        if name != "embeddings.position_ids":
            out[name] = value
    return out


# OpenCLIP (SD2.x) <-> transformers CLIP names inside one transformer layer. The fused attention
# input projection (`attn.in_proj_*`, rows q, k, v) is split / joined separately.
_OPEN_CLIP_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_layer_count(checkpoint: dict, prefix: str = OPEN_CLIP_PREFIX) -> int:
    """Number of transformer layers of the OpenCLIP text encoder in a checkpoint (24 for SD2.x)."""
    found = {int(m.group(1)) for k in checkpoint if k.startswith(prefix)
             and (m := _RESBLOCK.match(k[len(prefix):]))}
    return max(found) + 1 if found else 0


def open_clip_to_diffusers(checkpoint: dict, prefix: str = OPEN_CLIP_PREFIX, with_projection: bool = False) -> dict:
    """CLIPTextModel weights (transformers 5 names) from an SD2.x checkpoint's OpenCLIP text encoder.

    SD2.x conditions on the penultimate layer (then `ln_final`), so the last of the file's layers
    (resblocks.23 of 24) is left out, as diffusers' SD2 text encoders (23 layers) do. The pooled
    output's `text_projection` and CLIP's `logit_scale` are not used by SD2 and are dropped.
    Written by hand rather than with diffusers' `convert_open_clip_checkpoint`, which hard-codes
    layer 23 and the `text_model.` level that transformers 5 removed.

    `with_projection` (SDXL's bigG, a CLIPTextModelWithProjection): every layer is kept (the pooled
    output runs them all) and `text_projection` becomes the Linear weight (OpenCLIP multiplies
    `x @ P`, so the weight is P transposed).
    """
    last = -1 if with_projection else open_clip_layer_count(checkpoint, prefix) - 1
    out = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
            continue
        if with_projection and name == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
            continue
        match = _RESBLOCK.match(name)
        if match is None or int(match.group(1)) == last:
            continue  # text_projection, logit_scale, the unused last layer
        layer, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight / bias
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part.clone()  # own storage: savable later
            continue
        for old, new in _OPEN_CLIP_LAYER:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[layer + rest] = value
    return out


def text_encoder_to_open_clip(te_sd: dict, prefix: str = OPEN_CLIP_PREFIX) -> dict:
    """The reverse of `open_clip_to_diffusers`, under `prefix`, as SD2.x files are laid out.

    The layer SD2 never runs (the file's last) and `text_projection` / `logit_scale` are not in a
    diffusers text encoder; original-layout loaders (WebUI, ComfyUI) expect them, so they are
    written as stand-ins that do not change SD2's conditioning: a copy of the last real layer, an
    identity projection and CLIP's initial logit scale. A text encoder with a projection (SDXL's
    bigG) has all its layers and its own projection: only `logit_scale` is a stand-in.
    """
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer_names = [(new, old) for old, new in _OPEN_CLIP_LAYER]
    out = {}
    te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items() if not k.endswith("position_ids")}
    for key, value in te_sd.items():
        if key in top:
            out[top[key]] = value
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        if match is None:
            continue
        layer, rest = f"transformer.resblocks.{match.group(1)}.", match.group(2)
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [te_sd[f"encoder.layers.{match.group(1)}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{layer}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            continue
        if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        for new, old in layer_names:
            if rest.startswith(new):
                rest = old + rest[len(new):]
                break
        out[layer + rest] = value
    width = out["token_embedding.weight"].shape[1]
    dtype = out["token_embedding.weight"].dtype
    if "text_projection.weight" in te_sd:
        out["text_projection"] = te_sd["text_projection.weight"].t().contiguous()
    else:
        n = 1 + max(int(m.group(1)) for k in out if (m := _RESBLOCK.match(k)))
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
            out[key.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.", 1)] = out[key].clone()
        out["text_projection"] = torch.eye(width, dtype=dtype)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    return {prefix + k: v for k, v in out.items()}


def ldm_to_diffusers(checkpoint: dict, unet_config: dict, vae_config: dict) -> tuple[dict, dict, dict]:
    """(unet, vae, text_encoder) state dicts from a full LDM checkpoint."""
    te = open_clip_to_diffusers(checkpoint) if is_open_clip(checkpoint) else text_encoder_to_diffusers(checkpoint)
    return unet_to_diffusers(checkpoint, unet_config), vae_to_diffusers(checkpoint, vae_config), te


def is_open_clip(checkpoint: dict) -> bool:
    """True for SD2.x checkpoints (OpenCLIP text encoder under `cond_stage_model.model.`)."""
    return any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint)


# ----------------------------------------------------------------------------- diffusers -> LDM

_UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                ("conv_shortcut.", "skip_connection.")]
_VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _count(keys, prefix: str) -> int:
    """How many numbered children `prefix<N>.` the keys have."""
    found = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len([n for n in found if n.isdigit()])


def _unet_prefixes(keys) -> dict:
    """diffusers module prefix -> (LDM prefix, renames applied to the rest of the key)."""
    layers = _count(keys, "down_blocks.0.resnets.")
    n_down, n_up = _count(keys, "down_blocks."), _count(keys, "up_blocks.")
    m = {"conv_in.": ("input_blocks.0.0.", []), "time_embedding.linear_1.": ("time_embed.0.", []),
         "time_embedding.linear_2.": ("time_embed.2.", []), "conv_norm_out.": ("out.0.", []),
         "conv_out.": ("out.2.", []), "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
         "mid_block.attentions.0.": ("middle_block.1.", []),
         "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
         # SDXL's pooled-text + size embedding
         "add_embedding.linear_1.": ("label_emb.0.0.", []), "add_embedding.linear_2.": ("label_emb.0.2.", [])}
    # LDM numbers blocks flat: input_blocks hold conv_in, then per level `layers` (resnet,
    # attention) pairs and a downsampler; output_blocks hold `layers + 1` pairs per level, the
    # level's last one ending with the upsampler (after the attention when there is one).
    for i in range(n_down):
        for j in range(layers):
            n = i * (layers + 1) + j + 1
            m[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n}.0.", _UNET_RESNET)
            m[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{n}.1.", [])
        m[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", [])
    for i in range(n_up):
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            m[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{n}.0.", _UNET_RESNET)
            m[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{n}.1.", [])
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        last = i * (layers + 1) + layers
        m[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{last}.{2 if has_attention else 1}.", [])
    return m


def _vae_prefixes(keys) -> dict:
    n_up = _count(keys, "decoder.up_blocks.")
    m = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", [])
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
        for j in range(2):
            m[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", _VAE_RESNET)
    for i in range(_count(keys, "encoder.down_blocks.")):
        for j in range(_count(keys, f"encoder.down_blocks.{i}.resnets.")):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", [])
    for i in range(n_up):
        level = n_up - 1 - i  # LDM counts decoder levels from the lowest resolution up
        for j in range(_count(keys, f"decoder.up_blocks.{i}.resnets.")):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.", _VAE_RESNET)
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{level}.upsample.", [])
    return m


def _rename(key: str, prefixes: dict) -> str:
    """Apply the longest matching module prefix of `key`; keys with none keep their name."""
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) > 0:
        head = key[:cut + 1]
        if head in prefixes:
            new_head, renames = prefixes[head]
            rest = key[cut + 1:]
            for old, new in renames:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            return new_head + rest
    return key


def unet_module_paths_to_ldm(paths, state_keys) -> dict:
    """diffusers UNet module paths (`down_blocks.1.attentions.0.proj_in`) -> the same modules' paths
    in the original layout (`input_blocks.4.1.proj_in`); `state_keys`: the UNet's state dict keys."""
    prefixes = _unet_prefixes(state_keys)
    return {path: _rename(path + ".", prefixes)[:-1] for path in paths}


def unet_to_ldm(unet_sd: dict) -> dict:
    prefixes = _unet_prefixes(unet_sd)
    return {UNET_PREFIX + _rename(k, prefixes): v for k, v in unet_sd.items()}


def vae_to_ldm(vae_sd: dict, prefix: str = VAE_PREFIX) -> dict:
    prefixes = _vae_prefixes(vae_sd)
    out = {}
    for key, value in vae_sd.items():
        new = _rename(key, prefixes)
        # The original VAE's mid-block attention uses 1x1 convs where diffusers uses Linear.
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[prefix + new] = value
    return out


def text_encoder_to_ldm(te_sd: dict) -> dict:
    """CLIP weights under `cond_stage_model.transformer.text_model.`, plus `position_ids`.

    Accepts keys with or without `text_model.`. `position_ids` is written (as int64 0..76) because
    real SD1.x files carry it and older loaders expect it.
    """
    out = {}
    for key, value in te_sd.items():
        out[TEXT_ENCODER_PREFIX + "text_model." + key.removeprefix("text_model.")] = value
    positions = out.get(TEXT_ENCODER_PREFIX + "text_model.embeddings.position_embedding.weight")
    if positions is not None:
        ids = torch.arange(positions.shape[0])[None]
        out[TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"] = ids
    return out


def diffusers_to_ldm(unet_sd: dict, vae_sd: dict, te_sd: dict, v2: bool = False) -> dict:
    """One LDM checkpoint dict from diffusers/transformers state dicts (v2: OpenCLIP text encoder)."""
    te = text_encoder_to_open_clip(te_sd) if v2 else text_encoder_to_ldm(te_sd)
    return {**unet_to_ldm(unet_sd), **vae_to_ldm(vae_sd), **te}

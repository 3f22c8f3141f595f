"""Which layers a LoRA may patch, whether a file's modules fit them, and merging into a model.

A module that names no layer of the model, or whose shapes do not fit its layer, is an error that
lists the modules: WebUI and ComfyUI drop such modules silently, which hides a LoRA made for
another base model (SD2.x, SDXL) behind a result that merely looks weak.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from library.errors import UserError
from networks import lora_format as fmt


@dataclass(frozen=True)
class Layer:
    kernel: tuple[int, int] | None  # None for Linear
    in_features: int
    out_features: int


def target_layers(unet, text_encoder) -> dict[str, Layer]:
    """Every layer a LoRA/LoCon file may name, by its file name (both parts, LoCon convs included)."""
    layers = {}
    parts = ((fmt.UNET_PREFIX, unet, fmt.UNET_TARGETS + fmt.UNET_CONV_TARGETS),
             (fmt.TE_PREFIX, text_encoder, fmt.TE_TARGETS))
    for prefix, root, classes in parts:
        if root is None:
            continue
        for path, layer in fmt.iter_targets(root, classes):
            if isinstance(layer, torch.nn.Conv2d):
                spec = Layer(tuple(layer.kernel_size), layer.in_channels, layer.out_channels)
            else:
                spec = Layer(None, layer.in_features, layer.out_features)
            layers[fmt.lora_name(prefix, path)] = spec
    return layers


@lru_cache(maxsize=1)
def sd15_layers() -> dict[str, Layer]:
    """The SD1.x target layers, from the shipped SD1.5 configs built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import arch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.model_kwargs(arch.shipped_config("unet")))
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.shipped_config("text_encoder")))
    return target_layers(unet, text_encoder)


def shape_problem(layer: Layer, down_shape, up_shape, check_sizes: bool = True) -> str | None:
    """Why (down, up) cannot patch `layer`, or None. Sizes are compared only with `check_sizes`."""
    down_shape, up_shape = tuple(down_shape), tuple(up_shape)
    if layer.kernel is None:
        if len(down_shape) != 2 or len(up_shape) != 2:
            return f"a Linear layer needs 2-D tensors, got down {list(down_shape)}, up {list(up_shape)}"
    else:
        if len(down_shape) != 4 or down_shape[2:] != layer.kernel or len(up_shape) != 4 or up_shape[2:] != (1, 1):
            kh, kw = layer.kernel
            return (f"a {kh}x{kw} conv needs down [r, in, {kh}, {kw}] and up [out, r, 1, 1], got down "
                    f"{list(down_shape)}, up {list(up_shape)}")
    if check_sizes and (down_shape[1] != layer.in_features or up_shape[0] != layer.out_features):
        return (f"the layer is {layer.in_features} -> {layer.out_features}, the LoRA "
                f"{down_shape[1]} -> {up_shape[0]}")
    return None


def _flat_1x1(layer: Layer, down: torch.Tensor, up: torch.Tensor):
    """2-D tensors for a 1x1 conv (some tools write those; WebUI/ComfyUI accept them) as 4-D."""
    if layer.kernel == (1, 1) and down.dim() == 2 and up.dim() == 2:
        return down[:, :, None, None], up[:, :, None, None]
    return down, up


def check_fits(lora, layers: dict[str, Layer], flag: str) -> None:
    """Raise a UserError listing the modules of `lora` (a LoraFile) that the model cannot take."""
    unknown, misfit = [], []
    for name, m in lora.modules.items():
        layer = layers.get(name)
        if layer is None:
            unknown.append(name)
            continue
        down, up = _flat_1x1(layer, m.down, m.up)
        why = shape_problem(layer, down.shape, up.shape)
        if why:
            misfit.append(f"{name} ({why})")
    if not unknown and not misfit:
        return
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} modules name layers the model does not have ({', '.join(unknown[:3])}"
                     + (", ..." if len(unknown) > 3 else "") + ")")
    if misfit:
        parts.append(f"{len(misfit)} modules do not fit their layer ({'; '.join(misfit[:2])}"
                     + ("; ..." if len(misfit) > 2 else "") + ")")
    raise UserError(
        f"the LoRA {lora.path} does not fit the model given by {flag}: {' and '.join(parts)}. A LoRA "
        "trained for another base model (SD2.x, SDXL) looks like this.", path=lora.path,
        fix=f"use a LoRA trained on an SD1.x model, or pass the base model it was trained on with {flag}.")


def merge_into_model(unet, text_encoder, loras, ratios, flag: str, device=None) -> None:
    """W += ratio * (alpha/r) * up @ down for every module of every LoRA (networks.lora's merge, fp32).

    Every file is checked against the model before any weight changes, so an error leaves the
    model untouched.
    """
    from tqdm.auto import tqdm

    from networks import lora as lora_net

    layers = target_layers(unet, text_encoder)
    for lora in loras:
        check_fits(lora, layers, flag)
    for lora, ratio in tqdm(list(zip(loras, ratios)), desc="merging", unit="file"):
        network, weights = lora_net.create_network_from_weights(ratio, lora.path, None, text_encoder, unet,
                                                                weights_sd=lora.state_dict())
        network.merge_to(text_encoder, unet, weights, device=device)

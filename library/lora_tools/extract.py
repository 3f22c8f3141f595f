"""A LoRA from the difference of two models (tuned - original), one SVD per target layer.

Targets are those of networks.lora: with `conv_dim` also the LoCon layers (ResNet blocks,
down/upsamplers). A part (text encoder, U-Net) whose largest weight change is at most `min_diff`
is left out, as kohya does: fine-tunes often keep the text encoder unchanged.
"""
from __future__ import annotations

import torch

from library.errors import UserError
from library.lora_tools import svd
from library.lora_tools.model_fit import target_layers
from library.lora_tools.weights import ModuleWeights
from networks import lora_format as fmt


def paired_layers(org, tuned, conv: bool):
    """{part: [(lora name, original layer, tuned layer)]} for part in ("text encoder", "U-Net")."""
    if target_layers(org.unet, org.text_encoder) != target_layers(tuned.unet, tuned.text_encoder):
        raise UserError(
            f"the two models have different architectures ({org.model_path} and {tuned.model_path}), so "
            "their difference is not a LoRA.", path=tuned.model_path,
            fix="pass --model_tuned a fine-tune of the --model_org checkpoint (same model family and size).")
    unet_classes = fmt.UNET_TARGETS + (fmt.UNET_CONV_TARGETS if conv else ())
    parts = {}
    for part, prefix, a, b, classes in (("text encoder", fmt.TE_PREFIX, org.text_encoder, tuned.text_encoder,
                                         fmt.TE_TARGETS),
                                        ("U-Net", fmt.UNET_PREFIX, org.unet, tuned.unet, unet_classes)):
        theirs = dict(fmt.iter_targets(b, classes))
        parts[part] = [(fmt.lora_name(prefix, path), layer, theirs[path]) for path, layer in fmt.iter_targets(a, classes)]
    return parts


@torch.no_grad()
def largest_change(pairs, device) -> float:
    return max((float((t.weight.to(device, torch.float32) - o.weight.to(device, torch.float32)).abs().max())
                for _, o, t in pairs), default=0.0)


def clamp_factors(down: torch.Tensor, up: torch.Tensor, quantile: float):
    """Clip both factors' entries to the `quantile` of their absolute values (1 = no clipping)."""
    if quantile >= 1:
        return down, up
    values = torch.cat([down.flatten(), up.flatten()]).abs().float()
    if values.numel() > 1 << 24:  # torch.quantile's input limit: estimate from a regular subsample
        values = values[:: values.numel() // (1 << 24) + 1]
    hi = float(torch.quantile(values, quantile))
    return down.clamp(-hi, hi), up.clamp(-hi, hi)


@torch.no_grad()
def extract(org, tuned, dim: int, conv_dim: int | None = None, clamp_quantile: float = 0.99,
            min_diff: float = 0.01, device=None) -> tuple[list[ModuleWeights], list[str]]:
    """(modules, notes): rank-`dim` LoRA (3x3 convs: rank `conv_dim`) of tuned - org.

    alpha = dim (conv_dim) for every module, so the scale is 1 except where a layer is smaller than
    the rank; one alpha per kind keeps diffusers in step with the others.
    """
    from tqdm.auto import tqdm

    device = device or torch.device("cpu")
    notes, work = [], []
    for part, pairs in paired_layers(org, tuned, conv=bool(conv_dim)).items():
        change = largest_change(pairs, device)
        if change <= min_diff:
            notes.append(f"the {part} is unchanged (largest weight change {change:.3g} <= --min_diff "
                         f"{min_diff}); it is left out")
        else:
            work += pairs
    if not work:
        raise UserError(f"{org.model_path} and {tuned.model_path} do not differ by more than --min_diff "
                        f"{min_diff} in any layer, so there is nothing to extract.", path=tuned.model_path,
                        fix="check that --model_tuned is the fine-tuned model, or lower --min_diff.")
    modules = []
    for name, o, t in tqdm(work, desc="extracting", unit="module"):
        diff = t.weight.to(device, torch.float32) - o.weight.to(device, torch.float32)
        conv3x3 = diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1)
        u, s, vh = svd.full_svd(diff.flatten(1))
        alpha = float(conv_dim if conv3x3 else dim)
        rank = min(int(alpha), len(s))
        down, up = svd.to_lora(u, s, vh, rank, alpha, diff.shape)
        down, up = clamp_factors(down, up, clamp_quantile)
        modules.append(ModuleWeights(name, down.cpu(), up.cpu(), alpha))
    return modules, notes

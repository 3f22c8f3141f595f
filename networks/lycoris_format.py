"""The LyCORIS file format (LoHa, LoKr, DoRA) and the weight change each module of such a file makes.

One module's tensors, under the kohya names (`lora_unet_...`, `lora_te_text_model_...`):

    LoRA / LoCon  lora_down.weight, lora_up.weight, alpha
    LoHa          hada_w1_a [out, r], hada_w1_b [r, in*kh*kw], hada_w2_a, hada_w2_b, alpha
    LoKr          lokr_w1 [l, m] or lokr_w1_a/_b; lokr_w2 [k, n(, kh, kw)] or lokr_w2_a [k, r] /
                  lokr_w2_b [r, n*kh*kw]; alpha (out = l*k, in = m*n)
    + DoRA        dora_scale [1, in] (Linear) / [1, in, 1, 1] (Conv2d): the magnitude per input channel

The delta at multiplier 1 is scale * product, scale = alpha / r (r: the rank of a low-rank factor;
1 for a LoKr with two full factors, whose alpha the clients ignore). With dora_scale the layer's
weight becomes dora_scale * (W + delta) / ||W + delta|| (norm per input channel), which is the rule
WebUI (network.py apply_weight_decompose) and ComfyUI (weight_adapter weight_decompose) apply.
`module_delta` computes it; the tools, merges and `merge_to` all use it.
"""
from __future__ import annotations

import math

import torch

from library.errors import UserError

LORA_KEYS = frozenset({"lora_down.weight", "lora_up.weight"})
LOHA_KEYS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
LOKR_KEYS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})
COMMON_KEYS = frozenset({"alpha", "dora_scale"})
KNOWN_KEYS = LORA_KEYS | LOHA_KEYS | LOKR_KEYS | COMMON_KEYS
TENSOR_SUFFIXES = tuple("." + k for k in sorted(KNOWN_KEYS))

# What other LyCORIS algorithms write, so an error can say what the file is.
_OTHER = {"hada_t1": "LoHa with use_tucker", "hada_t2": "LoHa with use_tucker", "lokr_t2": "LoKr with use_tucker",
          "lora_mid.weight": "LoCon with use_tucker", "oft_blocks": "OFT", "oft_diag": "OFT",
          "w_norm": "train_norm", "b_norm": "train_norm", "diff": "full fine-tune (algo=full)",
          "diff_b": "full fine-tune (algo=full)", "on_input": "IA3", "weight": "IA3 / (IA)^3",
          "a1.weight": "GLoRA", "lora_A.weight": "PEFT/diffusers LoRA naming"}


def has_lycoris_modules(sd: dict) -> bool:
    """True when a state dict holds LoHa, LoKr or DoRA tensors (not only plain LoRA)."""
    extra = LOHA_KEYS | LOKR_KEYS | {"dora_scale"}
    return any(split_key(k)[1] in extra for k in sd)


def split_key(key: str) -> tuple[str, str]:
    name, _, suffix = key.partition(".")
    return name, suffix


def group_modules(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, suffix = split_key(key)
        out.setdefault(name, {})[suffix] = value
    return out


def module_algo(name: str, tensors: dict, path=None) -> str:
    """"lora", "loha" or "lokr" (DoRA is `"dora_scale" in tensors` on top); unknown keys raise."""
    unknown = sorted(set(tensors) - KNOWN_KEYS)
    if unknown:
        what = next((_OTHER[k] for k in unknown if k in _OTHER), None)
        raise UserError(
            f"the module {name} holds tensors this program does not know: {', '.join(unknown)}"
            + (f" ({what}, which is not supported here)" if what else "") + ".", path=path,
            fix="use a LoRA, LoCon, LoHa, LoKr or DoRA file (LyCORIS: algo=lora/locon/loha/lokr, dora_wd), "
                "without use_tucker or train_norm.")
    kinds = [algo for algo, keys in (("lora", LORA_KEYS), ("loha", LOHA_KEYS), ("lokr", LOKR_KEYS))
             if keys & set(tensors)]
    if len(kinds) != 1:
        raise UserError(f"the module {name} has {'no' if not kinds else 'mixed'} adapter tensors "
                        f"({', '.join(sorted(tensors)) or 'none'}).", path=path,
                        fix="the file is damaged or not an adapter; save it again from its source.")
    algo = kinds[0]
    missing = []
    if algo == "lora":
        missing = sorted(LORA_KEYS - set(tensors))
    elif algo == "loha":
        missing = sorted(LOHA_KEYS - set(tensors))
    else:
        for w in ("lokr_w1", "lokr_w2"):
            if w not in tensors and not {w + "_a", w + "_b"} <= set(tensors):
                missing.append(f"{w} (or {w}_a and {w}_b)")
    if missing:
        raise UserError(f"the module {name} ({algo}) has no {', '.join(missing)}.", path=path,
                        fix="the file is incomplete; save it again from its source.")
    return algo


def lokr_rank(tensors: dict) -> int | None:
    """The rank the clients divide alpha by (w2's low-rank factor first, then w1's); None if both full."""
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in tensors:
            value = tensors[key]
            return int(value.shape[0] if hasattr(value, "shape") else value[0])  # a tensor or a shape
    return None


def module_rank(algo: str, tensors: dict) -> int | None:
    if algo == "lora":
        return int(tensors["lora_down.weight"].shape[0])
    if algo == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    return lokr_rank(tensors)


def module_scale(algo: str, tensors: dict) -> float:
    """alpha / rank; a missing (or 0) alpha counts as the rank (sd-scripts' reading), LoKr full: 1."""
    rank = module_rank(algo, tensors)
    if rank is None:
        return 1.0
    alpha = tensors.get("alpha")
    alpha = float(alpha) if alpha is not None and alpha.numel() == 1 else 0.0
    return (alpha or rank) / rank


def product(algo: str, tensors: dict, weight_shape, device=None) -> torch.Tensor:
    """The module's unscaled product shaped like the layer's weight, fp32."""
    t = {k: v.to(device, torch.float32) for k, v in tensors.items() if k != "dora_scale"}
    shape = tuple(weight_shape)
    if algo == "lora":
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)
    if algo == "loha":
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return kron(w1, w2, shape)


def kron(w1: torch.Tensor, w2: torch.Tensor, weight_shape) -> torch.Tensor:
    """w1 (x) w2 shaped like the weight; a conv kernel lives in w2 (4-D, or flattened into its columns)."""
    shape = tuple(weight_shape)
    if len(shape) == 4:
        k, n = w2.shape[0], shape[1] // w1.shape[1]
        w2 = w2.reshape(k, n, *shape[2:])
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """dora_scale * (W + delta) / ||W + delta||, the norm taken per input channel (over out, kh, kw)."""
    merged = weight + delta
    dims = [0] + list(range(2, merged.dim()))
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return merged * (dora_scale.reshape(norm.shape) / norm)


def dora_scale_shape(weight_shape) -> tuple[int, ...]:
    return (1, int(weight_shape[1])) + (1,) * (len(weight_shape) - 2)


def module_delta(name: str, tensors: dict, weight: torch.Tensor, device=None, path=None) -> torch.Tensor:
    """The change to `weight` this module makes at multiplier 1 (fp32, on `device`)."""
    algo = module_algo(name, tensors, path)
    weight32 = weight.to(device, torch.float32)
    delta = product(algo, tensors, weight.shape, device) * module_scale(algo, tensors)
    scale = tensors.get("dora_scale")
    if scale is None:
        return delta
    if tuple(scale.shape) != dora_scale_shape(weight.shape):
        raise UserError(
            f"the module {name} has a dora_scale of shape {list(scale.shape)}; this program, WebUI and "
            f"ComfyUI apply the per-input-channel one, {list(dora_scale_shape(weight.shape))}.", path=path,
            fix="retrain with the magnitude on the input axis (LyCORIS: wd_on_out=False), as this program does.")
    return dora_weight(weight32, delta, scale.to(device, torch.float32)) - weight32


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when given; else the most balanced split.

    LyCORIS picks the closest smaller divisor when `factor` does not divide the dimension; here
    that is an error (see `lokr_shapes`), so a file's layout is what the user asked for.
    """
    if factor > 0:
        if dimension % factor:
            raise ValueError(f"{factor} does not divide {dimension}")
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    best = (1, dimension)
    for m in range(2, int(math.isqrt(dimension)) + 1):
        if dimension % m == 0:
            best = (m, dimension // m)
    return best

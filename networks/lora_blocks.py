"""Per-block ranks and learning rates for `networks.lora` (kohya's `block_dims` / `down_lr_weight` family).

kohya numbers the SD1/SD2 UNet in 25 blocks, as the original (LDM) layout does:

    0-11  IN00-IN11   input_blocks   (IN00 is conv_in, which never gets a LoRA)
    12    MID         middle_block
    13-24 OUT00-OUT11 output_blocks

Each down/up level of the diffusers UNet holds 3 of them: down level i covers IN(3i+1) .. IN(3i+3)
(two ResNet+attention pairs, then the downsampler); up level i covers OUT(3i) .. OUT(3i+2) (three
pairs, the upsampler sharing the last one). A module's block follows from its LoRA name, so the
mapping holds for any model with this structure (SD1.x, SD2.x and the tiny test models).

`block_dims` etc. take 25 comma-separated values; `down_lr_weight` / `up_lr_weight` take 12 values
or a preset name, `mid_lr_weight` one value.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from library.errors import UserError

logger = logging.getLogger(__name__)

NUM_BLOCKS = 12  # per side (IN / OUT)
NUM_MID = 1
NUM_TOTAL = 2 * NUM_BLOCKS + NUM_MID  # 25
MID_INDEX = NUM_BLOCKS

BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def block_index(lora_name: str) -> int | None:
    """0-24 for a UNet LoRA module name (see the module docstring); None for text-encoder names."""
    if not lora_name.startswith("lora_unet_"):
        return None
    match = _UPDOWN.search(lora_name)
    if match:
        side, level, kind, number = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        # samplers sit in the level's third slot (kohya: the downsampler is IN(3i+3), the upsampler
        # shares OUT(3i+2) with the level's last ResNet)
        slot = 3 * level + (2 if kind.endswith("samplers") else number)
        return 1 + slot if side == "down" else NUM_BLOCKS + NUM_MID + slot
    if "_mid_block_" in lora_name:
        return MID_INDEX
    return None


def block_label(index: int) -> str:
    """IN00 .. IN11, MID, OUT00 .. OUT11 (the names block-weight tools use)."""
    if index < NUM_BLOCKS:
        return f"IN{index:02d}"
    if index == MID_INDEX:
        return "MID"
    return f"OUT{index - NUM_BLOCKS - NUM_MID:02d}"


# --- parsing ---------------------------------------------------------------------------------

def _bad(key: str, value, what: str) -> UserError:
    return UserError(f"network argument {key}={value!r} is not valid: {what}.",
                     fix=f"pass --network_args \"{key}=...\"; see docs/train_network.md (per-block options).")


def _text(value) -> str:
    """The option as text: train_network's --network_args parser turns "1,2,3" into (1, 2, 3)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).strip()


def _values(key: str, text, kind, count: int | None = None) -> list:
    """Comma-separated numbers; an empty item means 0 (kohya's rule for lr weights)."""
    text = _text(text)
    parts = [p.strip() for p in text.split(",")]
    try:
        floats = [float(p) if p else 0.0 for p in parts]
    except ValueError:
        raise _bad(key, text, f"expected comma-separated {'integers' if kind is int else 'numbers'}") from None
    if kind is int and any(math.isfinite(v) and v != int(v) for v in floats):
        raise _bad(key, text, "ranks must be whole numbers")
    values = [kind(v) if math.isfinite(v) else v for v in floats]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise _bad(key, text, "values must be finite and >= 0")
    if count is not None and len(values) != count:
        raise _bad(key, text, f"expected {count} values (12 IN blocks, MID, 12 OUT blocks), got {len(values)}")
    return values


def _preset(key: str, text: str) -> list[float]:
    """kohya's named curves over the 12 blocks of one side, with an optional "+offset"."""
    name, _, offset_text = text.partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        raise _bad(key, text, "the part after '+' must be a number") from None
    n = NUM_BLOCKS
    ramp = [i / (n - 1) for i in range(n)]  # 0 .. 1, shallow -> deep
    curves = {"linear": ramp, "reverse_linear": ramp[::-1],
              "sine": [math.sin(math.pi * r / 2) for r in ramp],
              "cosine": [math.sin(math.pi * r / 2) for r in ramp[::-1]],
              "zeros": [0.0] * n}
    if name not in curves:
        raise _bad(key, text, f"expected numbers or one of {', '.join(PRESETS)} (optionally with '+offset')")
    return [v + offset for v in curves[name]]


def _fit(key: str, values: list[float], size: int) -> list[float]:
    """kohya's leniency: extra values are dropped, missing ones are 1 (each with a warning)."""
    if len(values) > size:
        logger.warning("%s has %d values; only the first %d are used", key, len(values), size)
        return values[:size]
    if len(values) < size:
        logger.warning("%s has %d values; the missing %d are set to 1", key, len(values), size - len(values))
        return values + [1.0] * (size - len(values))
    return values


def parse_lr_weights(kwargs: dict) -> list[float] | None:
    """25 lr multipliers from down/mid/up_lr_weight (None when none is given).

    Weights <= block_lr_zero_threshold become 0: those blocks get no LoRA modules at all.
    """
    given = {k: kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")}
    given = {k: _text(v) for k, v in given.items() if v is not None and _text(v) != ""}
    if not given:
        return None
    threshold_text = kwargs.get("block_lr_zero_threshold")
    threshold = 0.0 if threshold_text in (None, "") else _values("block_lr_zero_threshold", threshold_text, float, 1)[0]

    def side(key: str, size: int) -> list[float]:
        text = given.get(key)
        if text is None:
            return [1.0] * size
        if size > 1 and text.split("+")[0].strip() in PRESETS:
            values = _preset(key, text.replace(" ", ""))
        else:
            values = _values(key, text, float)
        return [v if v > threshold else 0.0 for v in _fit(key, values, size)]

    weights = side("down_lr_weight", NUM_BLOCKS) + side("mid_lr_weight", NUM_MID) + side("up_lr_weight", NUM_BLOCKS)
    logger.info("per-block lr weights: %s", ", ".join(f"{block_label(i)} {w:g}" for i, w in enumerate(weights)))
    return weights


@dataclass
class BlockDims:
    """Rank and alpha per block for Linear/1x1 layers, and for 3x3 convs (None: no 3x3 LoRA)."""
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    def for_module(self, index: int, is_conv3x3: bool) -> tuple[int, float]:
        if is_conv3x3:
            if self.conv_dims is None:
                return 0, 0.0
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]


def parse_block_dims(kwargs: dict, network_dim: int, network_alpha: float, conv_dim: int | None,
                     conv_alpha: float | None, lr_weights: list[float] | None) -> BlockDims | None:
    """Per-block ranks from block_dims/... (None when neither those nor lr weights are given).

    As in kohya, lr weights alone also switch this on, so that blocks with weight 0 get no modules;
    unlike kohya, `block_alphas` / `conv_block_dims` without `block_dims` are not silently ignored.
    """
    given = {k: kwargs[k] for k in BLOCK_DIM_KEYS if kwargs.get(k) is not None and _text(kwargs[k]) != ""}
    if not given and lr_weights is None:
        return None
    dims = _values("block_dims", given["block_dims"], int, NUM_TOTAL) if "block_dims" in given \
        else [network_dim] * NUM_TOTAL
    alphas = _values("block_alphas", given["block_alphas"], float, NUM_TOTAL) if "block_alphas" in given \
        else [float(network_alpha)] * NUM_TOTAL
    conv_dims = conv_alphas = None
    if "conv_block_dims" in given:
        conv_dims = _values("conv_block_dims", given["conv_block_dims"], int, NUM_TOTAL)
    elif conv_dim:
        conv_dims = [conv_dim] * NUM_TOTAL
    if conv_dims is not None:
        conv_alphas = _values("conv_block_alphas", given["conv_block_alphas"], float, NUM_TOTAL) \
            if "conv_block_alphas" in given else [float(conv_alpha or 1.0)] * NUM_TOTAL
    elif "conv_block_alphas" in given:
        logger.warning("conv_block_alphas is ignored without conv_block_dims or conv_dim")
    if lr_weights is not None:  # a block that is not trained gets no modules
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    logger.info("per-block ranks (Linear%s): %s", "" if conv_dims is None else " / 3x3 conv",
                ", ".join(f"{block_label(i)} {d}" + ("" if conv_dims is None else f"/{conv_dims[i]}")
                          for i, d in enumerate(dims) if i))  # IN00 (conv_in) never has modules
    return BlockDims(dims, alphas, conv_dims, conv_alphas)

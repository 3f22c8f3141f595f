"""Several LoRA files as one set of per-module factors, and the exact merge by rank concatenation.

For each module, sum_i ratio_i * delta_i = [A_1 ... A_n] @ [B_1; ...; B_n] with A_i = ratio_i *
scale_i * up_i and B_i = down_i: stacking the ranks gives exactly the weighted sum of the deltas.
(kohya's merge without --concat adds the up and down matrices themselves, which is not that sum;
here both ways concatenate.)
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from library.errors import UserError
from library.lora_tools.weights import ModuleWeights


@dataclass
class ModuleParts:
    """One module name across the input files, with the ratio each file is merged at."""
    name: str
    parts: list[tuple[ModuleWeights, float]]
    weight_shape: tuple[int, ...]

    @property
    def is_conv3x3(self) -> bool:
        return len(self.weight_shape) == 4 and self.weight_shape[2:] != (1, 1)

    def factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A @ B = sum of ratio * delta, flattened to [out, in*kh*kw]."""
        pairs = [m.factors(ratio, device) for m, ratio in self.parts]
        return torch.cat([a for a, _ in pairs], 1), torch.cat([b for _, b in pairs], 0)

    def delta(self, device=None) -> torch.Tensor:
        a, b = self.factors(device)
        return (a @ b).reshape(self.weight_shape)


def group_modules(loras, ratios) -> list[ModuleParts]:
    """Modules by name over all files; a name with different layer shapes in two files is an error."""
    groups: dict[str, ModuleParts] = {}
    first_file: dict[str, object] = {}
    for lora, ratio in zip(loras, ratios):
        for m in lora.modules.values():
            shape = m.weight_shape
            group = groups.get(m.name)
            if group is None:
                groups[m.name] = ModuleParts(m.name, [(m, ratio)], shape)
                first_file[m.name] = lora.path
                continue
            if _flat(group.weight_shape) != _flat(shape):
                raise UserError(
                    f"the LoRAs were made for different models: {m.name} patches a {list(group.weight_shape)} "
                    f"weight in {first_file[m.name]} but a {list(shape)} weight in {lora.path}.", path=lora.path,
                    fix="merge only LoRAs trained on the same base model family (e.g. all SD1.x).")
            if len(shape) > len(group.weight_shape):  # a 1x1 conv written 2-D by one tool, 4-D by another
                group.weight_shape = shape
            group.parts.append((m, ratio))
    return [groups[name] for name in sorted(groups)]


def _flat(shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def concat_merge(groups: list[ModuleParts]) -> list[ModuleWeights]:
    """Exact merge: each module's rank is the sum of its ranks in the inputs.

    One alpha for all Linear modules and one for the 3x3 convs (the most common merged rank, so
    their scale is 1): diffusers ignores per-module alphas on attention layers. Each part's
    ratio * scale * rank/alpha is split evenly (signed) between its up and down, keeping both
    factors of the size they had.
    """
    linear_ranks = Counter(sum(m.rank for m, _ in g.parts) for g in groups if not g.is_conv3x3)
    conv_ranks = Counter(sum(m.rank for m, _ in g.parts) for g in groups if g.is_conv3x3)
    alphas = {False: float(linear_ranks.most_common(1)[0][0]) if linear_ranks else 1.0,
              True: float(conv_ranks.most_common(1)[0][0]) if conv_ranks else 1.0}
    merged = []
    for g in groups:
        alpha = alphas[g.is_conv3x3]
        rank = sum(m.rank for m, _ in g.parts)
        downs, ups = [], []
        for m, ratio in g.parts:
            c = ratio * m.scale * rank / alpha
            root = math.sqrt(abs(c))
            down = m.down.float().reshape(m.rank, *g.weight_shape[1:]) * root
            up = m.up.float().reshape(g.weight_shape[0], m.rank, *([1, 1] if len(g.weight_shape) == 4 else []))
            downs.append(down)
            ups.append(up * math.copysign(root, c))
        merged.append(ModuleWeights(g.name, torch.cat(downs, 0), torch.cat(ups, 1), alpha))
    return merged


# --- per-block weights (kohya's svd_merge_lora --lbws, in the LoRA Block Weight extension's layout) ---
# The 26 slots are BASE (text encoder), IN00..IN11, MID, OUT00..OUT11; a 17-value list names the SD1.x
# blocks that hold LoRA modules: BASE, IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03..OUT11.
LBW17_SLOTS = (0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25)


def parse_lbws(texts: list[str] | None, count: int) -> list[list[float] | None]:
    """One 26-slot weight list (or None: all 1) per model from kohya's JSON lists of 17 or 26 numbers."""
    import json

    out: list[list[float] | None] = []
    for i, text in enumerate(texts or []):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise UserError(f"--lbws item {i + 1} is not a JSON list of numbers: {text!r}.",
                            fix='write each as "[1,1,0.5,...]" with 17 (or 26) numbers.')
        if len(values) in (12, 20):
            raise UserError(f"--lbws item {i + 1} has {len(values)} values, kohya's SDXL layout; this tool merges "
                            "SD1.x/SD2.x LoRAs.", fix="give 17 values (or 26: BASE, IN00-IN11, MID, OUT00-OUT11).")
        if len(values) not in (17, 26):
            raise UserError(f"--lbws item {i + 1} has {len(values)} values.",
                            fix="give 17 values (BASE, IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03-OUT11) or 26.")
        slots = [1.0] * 26
        for slot, value in zip(LBW17_SLOTS if len(values) == 17 else range(26), values):
            slots[slot] = float(value)
        out.append(slots)
    if len({len(json.loads(t)) for t in texts or []}) > 1:
        raise UserError("the --lbws lists have different lengths.", fix="give every list 17 values (or every one 26).")
    if len(out) > count:
        raise UserError(f"--lbws has {len(out)} lists for {count} --models.", fix="give at most one per model.")
    return out + [None] * (count - len(out))


def lbw_slot(module_name: str) -> int | None:
    """The 26-slot index of a module (kohya's get_lbw_block_index): 0 for the text encoder."""
    from networks.lora_blocks import block_index

    if module_name.startswith("lora_te"):
        return 0
    index = block_index(module_name)
    return None if index is None else 1 + index


def weight_blocks(lora, slots: list[float] | None):
    """A copy of a LoRA file with each module scaled by its block's weight (up scaled, so the ratio,
    alpha and rank stay as they are)."""
    from dataclasses import replace

    if slots is None:
        return lora
    modules = {}
    for name, m in lora.modules.items():
        slot = lbw_slot(name)
        weight = 1.0 if slot is None else slots[slot]
        modules[name] = m if weight == 1.0 else replace(m, up=m.up * weight)
    return replace(lora, modules=modules)

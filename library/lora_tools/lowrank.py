"""Rank reduction of LoRA deltas by SVD: resize one file, or merge several into a new rank.

One alpha per kind of module (Linear, 3x3 conv) for the whole file, whatever rank each module
gets: diffusers ignores per-module alphas on attention layers, so a module's own scale is folded
into its factors instead (svd.to_lora).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from library.lora_tools import svd
from library.lora_tools.weights import ModuleWeights, common_alphas


@dataclass
class RankChange:
    """One module's reduction, for the printed report."""
    name: str
    old_rank: int
    new_rank: int
    norm: float  # ||delta||_F before
    error: float  # ||delta - reduced||_F = sqrt(sum of the dropped S^2)
    algo: str = "lora"  # loha / lokr: converted to a plain LoRA

    @property
    def retained(self) -> float:
        """Share of the Frobenius norm kept, sqrt(1 - error^2 / norm^2)."""
        if self.norm == 0:
            return 1.0
        return max(0.0, 1.0 - (self.error / self.norm) ** 2) ** 0.5

    def format(self) -> str:
        old = f"rank {self.old_rank} -> {self.new_rank}" if self.algo == "lora" else \
            f"{self.algo} -> LoRA rank {self.new_rank}"
        return (f"{self.name}: {old}, retained Frobenius norm "
                f"{100 * self.retained:.2f}%, error {self.error:.3g}")


def reduce(name: str, a: torch.Tensor, b: torch.Tensor, weight_shape, max_rank: int, alpha: float,
           method: str | None = None, param: float | None = None) -> tuple[ModuleWeights, RankChange]:
    """The best rank-k LoRA for delta = a @ b (k from max_rank and the dynamic method)."""
    u, s, vh = svd.factored_svd(a, b)
    rank = svd.select_rank(s, max_rank, method, param)
    down, up = svd.to_lora(u, s, vh, rank, alpha, weight_shape)
    norm = float(s.double().square().sum().sqrt())
    change = RankChange(name, a.shape[1], rank, norm, svd.discarded_fro(s, rank))
    return ModuleWeights(name, down.cpu(), up.cpu(), alpha), change


def resize(lora, new_rank: int, new_conv_rank: int | None = None, method: str | None = None,
           param: float | None = None, device=None):
    """Every module of a LoraFile reduced to at most new_rank (3x3 convs: new_conv_rank).

    The file's scale (alpha / rank) carries over: alpha becomes scale * new rank, as in kohya.
    Returns (modules, changes).
    """
    from tqdm.auto import tqdm

    new_conv_rank = new_conv_rank or new_rank
    modules = list(lora.modules.values())
    linear_alpha, conv_alpha = common_alphas(modules)
    alphas = {False: _carried_alpha(modules, False, linear_alpha, new_rank),
              True: _carried_alpha(modules, True, conv_alpha, new_conv_rank)}
    out, changes = [], []
    for m in tqdm(modules, desc="resizing", unit="module"):
        a, b = m.factors(1.0, device)
        limit = new_conv_rank if m.is_conv3x3 else new_rank
        module, change = reduce(m.name, a, b, m.weight_shape, limit, alphas[m.is_conv3x3], method, param)
        module.dora_scale, change.algo = m.dora_scale, m.algo  # DoRA: the magnitude is kept as it is
        out.append(module)
        changes.append(change)
    return out, changes


def _carried_alpha(modules, conv: bool, alpha, new_rank: int) -> float:
    ranks = [m.rank for m in modules if m.is_conv3x3 == conv]
    if not ranks:
        return float(new_rank)
    common_rank = max(set(ranks), key=ranks.count)
    return float(alpha) / common_rank * new_rank


def svd_merge(groups, new_rank: int, new_conv_rank: int | None = None, device=None):
    """Each module's ratio-weighted sum of deltas as one LoRA of rank new_rank (alpha = rank, as kohya)."""
    from tqdm.auto import tqdm

    new_conv_rank = new_conv_rank or new_rank
    dora = [g.name for g in groups if any(m.dora_scale is not None for m, _ in g.parts)]
    if dora:
        from library.errors import UserError

        raise UserError(f"{len(dora)} modules are DoRA (e.g. {dora[0]}): their change depends on the base "
                        "model's weights, so they cannot be summed into a LoRA without it.",
                        fix="merge DoRA files into the checkpoint with merge_lora.py --sd_model, or reduce one "
                            "DoRA file's rank with resize_lora.py (which keeps its dora_scale).")
    out, changes = [], []
    for g in tqdm(groups, desc="svd merge", unit="module"):
        a, b = g.factors(device)
        limit = new_conv_rank if g.is_conv3x3 else new_rank
        module, change = reduce(g.name, a, b, g.weight_shape, limit, float(limit))
        out.append(module)
        changes.append(change)
    return out, changes


def summary(changes: list[RankChange]) -> str:
    """The closing lines: ranks chosen and the worst retained norms."""
    if not changes:
        return "no modules"
    ranks = sorted({c.new_rank for c in changes})
    worst = min(changes, key=lambda c: c.retained)
    mean = sum(c.retained for c in changes) / len(changes)
    total = sum(c.error ** 2 for c in changes) ** 0.5
    return (f"{len(changes)} modules, new ranks {ranks[0]}..{ranks[-1]}; retained Frobenius norm: mean "
            f"{100 * mean:.2f}%, lowest {100 * worst.retained:.2f}% ({worst.name}); total error {total:.4g}")

"""SVD of weight deltas, rank selection, and turning singular vectors back into (down, up).

A LoRA delta is given as factors A @ B of inner size R (a file's rank, or the sum of ranks when
merging), so its SVD comes from two thin QRs and the SVD of an R x R matrix: exact, and far
cheaper than decomposing the full [out, in] matrix. Dropping singular values i >= k leaves a
Frobenius error of exactly sqrt(sum S_i^2 over i >= k) (Eckart-Young).
"""
from __future__ import annotations

import math

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def factored_svd(a: torch.Tensor, b: torch.Tensor):
    """(U, S, Vh) with U diag(S) Vh == a @ b, for a [out, R] and b [R, n], S descending."""
    qa, ra = torch.linalg.qr(a)  # a = qa ra
    qb, rb = torch.linalg.qr(b.T)  # b = rb^T qb^T
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, vh @ qb.T


def full_svd(mat: torch.Tensor):
    """(U, S, Vh) of a dense [out, n] matrix (used for differences of full models)."""
    return torch.linalg.svd(mat, full_matrices=False)


def select_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep: at most `max_rank`, at least 1 (1 for a zero delta).

    sv_ratio p:      keep values > S[0] / p
    sv_fro p:        the fewest values whose share of the Frobenius norm, sqrt(sum kept S^2 / sum S^2), is >= p
    sv_cumulative p: the fewest values whose share of sum(S) is >= p
    """
    s = s.double()
    if float(s[0]) <= 0:
        rank = 1
    elif method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    else:
        values = s.square() if method == "sv_fro" else s
        target = param * param if method == "sv_fro" else param
        shares = torch.cumsum(values, 0) / values.sum()
        # tolerance: a share that is exactly p in real numbers may come out a hair below it
        rank = int((shares < target - 1e-12).sum()) + 1
    return max(1, min(rank, max_rank, len(s)))


def retained_fro(s: torch.Tensor, rank: int) -> float:
    """Share of the delta's Frobenius norm that the first `rank` singular values keep (1.0 = all)."""
    total = float(s.double().square().sum())
    return 1.0 if total == 0 else math.sqrt(float(s[:rank].double().square().sum()) / total)


def discarded_fro(s: torch.Tensor, rank: int) -> float:
    """||delta - rank-k approximation||_F = sqrt(sum of the dropped S^2)."""
    return math.sqrt(float(s[rank:].double().square().sum()))


def to_lora(u, s, vh, rank: int, alpha: float, weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with (alpha / rank) * up @ down == the rank-k part of U diag(S) Vh, shaped for the layer.

    The singular values and the 1/scale are split evenly between the two factors so both stay
    of similar magnitude (what matters once they are stored in fp16).
    """
    root = (s[:rank] * (rank / alpha)).sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if len(weight_shape) == 4:
        up = up.reshape(weight_shape[0], rank, 1, 1)
        down = down.reshape(rank, *weight_shape[1:])
    return down.contiguous(), up.contiguous()

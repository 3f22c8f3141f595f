"""The extra loss terms of paired training: structure consistency and high-frequency detail.

Both work on *predicted x0 latents*. A noise-prediction UNet gives x0 only indirectly,

    x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t),

so an error in eps becomes an error in x0 multiplied by sqrt((1 - abar) / abar): about 15x at
t = 999, where the input is almost pure noise and the UNet cannot know the structure. Left
unweighted, those steps would dominate both terms. Every term is therefore multiplied per sample by
sqrt(abar) of the timestep(s) involved (the structure loss by sqrt(abar_a * abar_b), since it
compares two samples noised at independent timesteps): this cancels the 1/sqrt(abar) blow-up, so a
term is never larger than the noise-prediction error that causes it, and pure-noise steps
(abar -> 0) contribute about nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
STRUCT_LOSSES = ("l1", "ncc")
EPS = 1e-6


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in fp32; fp32/fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel responses of every channel of [B, C, H, W] (replicate padding)."""
    c = x.shape[1]
    kx = _SOBEL_X.to(x.device, x.dtype)
    weight = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # [2C, 1, 3, 3]
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)
    return out[:, 0::2], out[:, 1::2]


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, averaged over channels: [B, C, H, W] -> [B, 1, H, W].

    Magnitudes, not signed gradients: a vessel is dark on light in one modality and light on dark
    in the other, so only where edges are is shared, not their sign. The small epsilon keeps the
    square root differentiable where an image is flat.
    """
    gx, gy = sobel(x)
    return torch.sqrt(gx * gx + gy * gy + EPS).mean(dim=1, keepdim=True)


def structure_loss(x0_a: torch.Tensor, x0_b: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample disagreement [B] of the two images' edge maps.

    l1 (the original CF/FA scripts'): mean |E_a - E_b|. It cannot reach 0 on real aligned pairs when the two
    modalities have different edge strengths, so part of its gradient pushes appearance together.
    ncc: 1 - normalised cross-correlation of the edge maps, blind to edge strength (0 = same edges,
    up to scale). Both are symmetric in a and b and 0 for identical inputs.
    """
    ea, eb = edge_map(_wide(x0_a)), edge_map(_wide(x0_b))
    if kind == "l1":
        return (ea - eb).abs().mean(dim=(1, 2, 3))
    if kind == "ncc":
        ea = ea - ea.mean(dim=(1, 2, 3), keepdim=True)
        eb = eb - eb.mean(dim=(1, 2, 3), keepdim=True)
        num = (ea * eb).sum(dim=(1, 2, 3))
        den = torch.sqrt((ea * ea).sum(dim=(1, 2, 3)) * (eb * eb).sum(dim=(1, 2, 3)) + EPS)
        return 1.0 - num / den
    raise ValueError(f"unknown structure loss {kind!r}; use one of {STRUCT_LOSSES}")


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """What a 3x3 box blur removes: the image minus its local mean."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def high_frequency_loss(x0_pred: torch.Tensor, x0_true: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 [B] between the high frequencies of predicted and true x0 (fine texture)."""
    return (high_frequency(_wide(x0_pred)) - high_frequency(_wide(x0_true))).abs().mean(dim=(1, 2, 3))


def predicted_x0(noisy: torch.Tensor, pred: torch.Tensor, abar: torch.Tensor,
                 v_prediction: bool = False) -> torch.Tensor:
    """x0 from the UNet's output; `abar` [B] is alphas_cumprod at each sample's timestep."""
    a = _wide(abar).view(-1, 1, 1, 1)
    noisy, pred = _wide(noisy), _wide(pred)
    if v_prediction:
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    return (noisy - (1 - a).sqrt() * pred) / a.sqrt()


def timestep_weight(*abars: torch.Tensor) -> torch.Tensor:
    """sqrt of the product of abar over the timesteps involved (see the module docstring)."""
    out = torch.ones_like(abars[0], dtype=torch.float32)
    for abar in abars:
        out = out * abar.float()
    return out.sqrt()

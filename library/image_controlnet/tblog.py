"""TensorBoard logging with the original ImageControlNet script's tags, and training-curve PNGs drawn with Pillow.

Tags: Epoch/TrainLoss, Epoch/TrainImageLoss, Epoch/TrainPoseLoss, Epoch/ValLoss, Epoch/ValImageLoss,
Epoch/ValPSNR (plus Epoch/ValPoseLoss, Epoch/ValPoseErrorDeg, Epoch/ValCopyPSNR = PSNR of copying the
source, the baseline the model must beat, and Epoch/LR), Images/Comparison (rows: source | target |
generated), Images/Sample_<i>, and histograms Pose/Target, Pose/Source, Pose/Difference of the
training pairs' angles. matplotlib is not a dependency, so the curves are drawn with Pillow.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from library.fileio import atomic_path

SCALARS = {  # history key -> TensorBoard tag
    "train_loss": "Epoch/TrainLoss", "train_image_loss": "Epoch/TrainImageLoss",
    "train_pose_loss": "Epoch/TrainPoseLoss", "val_loss": "Epoch/ValLoss",
    "val_image_loss": "Epoch/ValImageLoss", "val_psnr": "Epoch/ValPSNR", "val_pose_loss": "Epoch/ValPoseLoss",
    "val_pose_error_deg": "Epoch/ValPoseErrorDeg", "val_copy_psnr": "Epoch/ValCopyPSNR", "lr": "Epoch/LR",
}


def log_epoch(writer, metrics: dict, epoch: int) -> None:
    for key, value in metrics.items():
        if key in SCALARS and value is not None and math.isfinite(value):
            writer.add_scalar(SCALARS[key], value, epoch)


def _to01(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clamp(-1, 1).add(1).div(2)


def log_images(writer, source, target, generated, epoch: int, samples: int = 4) -> None:
    rows = [torch.cat([_to01(s), _to01(t), _to01(g)], dim=2) for s, t, g in zip(source, target, generated)]
    writer.add_image("Images/Comparison", torch.cat(rows, dim=1), epoch)
    for i, (s, t, g) in enumerate(list(zip(source, target, generated))[:samples]):
        writer.add_image(f"Images/Sample_{i}", torch.cat([_to01(s), _to01(g), _to01(t)], dim=2), epoch)


def log_pose_histograms(writer, pairs, step: int = 0) -> None:
    src = np.array([p.source_pose for p in pairs], dtype=np.float64)
    tgt = np.array([p.target_pose for p in pairs], dtype=np.float64)
    writer.add_histogram("Pose/Target", tgt, step)
    writer.add_histogram("Pose/Source", src, step)
    writer.add_histogram("Pose/Difference", tgt - src, step)


# --- curve PNGs ---------------------------------------------------------------------------------

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(draw, font, box, series: dict, title: str, log_y: bool) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 16), title, fill=(0, 0, 0), font=font)
    shown = lambda v: v is not None and math.isfinite(v) and (v > 0 or not log_y)  # noqa: E731
    values = [v for vals in series.values() for v in vals if shown(v)]
    n = max((len(v) for v in series.values()), default=0)
    if not values or n == 0:
        return
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = min(map(tf, values)), max(map(tf, values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    px = lambda i: x0 + 8 + (x1 - x0 - 16) * (i / max(1, n - 1))  # noqa: E731
    py = lambda v: y1 - 8 - (y1 - y0 - 16) * ((tf(v) - lo) / (hi - lo))  # noqa: E731
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        label = f"{10 ** value:.3g}" if log_y else f"{value:.3g}"
        y = y1 - 8 - (y1 - y0 - 16) * frac
        draw.line([(x0, y), (x0 + 4, y)], fill=(0, 0, 0))
        draw.text((x0 - 46, y - 6), label, fill=(0, 0, 0), font=font)
    draw.text((x1 - 60, y1 + 4), f"epoch {n}", fill=(0, 0, 0), font=font)
    draw.text((x0, y1 + 4), "epoch 1", fill=(0, 0, 0), font=font)
    for k, (name, vals) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = [(px(i), py(v)) for i, v in enumerate(vals) if shown(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        # legend under the panel, so it never hides a curve
        draw.text((x0 + 130 * (k % 3), y1 + 22 + 14 * (k // 3)), name, fill=colour, font=font)


def save_curves(history: dict, path, title: str = "") -> None:
    """Losses (log scale) on the left, validation PSNR against the copy baseline on the right."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (960, 420), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    losses = {k: history.get(k, []) for k in ("train_loss", "val_loss", "train_image_loss", "val_image_loss",
                                               "train_pose_loss") if history.get(k)}
    psnrs = {k: history.get(k, []) for k in ("val_psnr", "val_copy_psnr") if history.get(k)}
    draw.text((60, 6), title, fill=(0, 0, 0), font=font)
    _panel(draw, font, (60, 44, 460, 350), losses, "loss (log scale)", log_y=True)
    _panel(draw, font, (540, 44, 940, 350), psnrs, "validation PSNR (dB)", log_y=False)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")

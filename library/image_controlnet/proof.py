"""Does a trained model follow the pose? Measured on fresh synthetic identities (never in training).

  PSNR of the model, of copying the frontal source, and of the model fed shuffled target poses
  (a model that ignores the pose loses nothing when they are shuffled);
  per-axis angle error of the best-matching render of the known identity (toy.best_match_angles),
  against chance (the same check on the copied source, and the mean error of a uniform guess);
  the model's own pose-head error.
PSNR alone is not trusted: an earlier toy experiment measured a model that beat the copy baseline while
ignoring yaw entirely.
"""
from __future__ import annotations

import numpy as np
import torch

from library.image_controlnet import toy
from library.image_controlnet.losses import psnr
from library.image_controlnet.model import POSE_SCALE


def _uniform_guess_error(targets: np.ndarray) -> np.ndarray:
    """Mean |t - u| for u ~ U(-r, r) per axis, averaged over the targets (chance level)."""
    r = np.array(toy.POSE_RANGE)
    return ((targets ** 2 + r ** 2) / (2 * r)).mean(0)  # E|t - u| = (t^2 + r^2) / 2r for |t| <= r


@torch.no_grad()
def evaluate(model, *, identities: int = 12, views: int = 6, seed: int = 1000, abs_samples: int = 48) -> dict:
    model.eval()
    size = model.config.image_size
    rng = np.random.default_rng(seed)
    idents, sources, targets, poses = [], [], [], []
    for i in range(identities):
        ident = toy.random_identity(rng, f"eval{i}")
        front = toy.render(ident, (0.0, 0.0, 0.0), size)
        for _ in range(views):
            pose = toy.random_pose(rng)
            idents.append(ident)
            sources.append(front)
            targets.append(toy.render(ident, pose, size))
            poses.append(pose)
    to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() * 2 - 1  # noqa: E731
    src, tgt = to_t(sources), to_t(targets)
    pose_t = torch.tensor(poses, dtype=torch.float32)[:, :model.config.pose_dim]
    out, pred = model(src, pose_t)
    shuffled = pose_t[torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(poses)))]
    out_shuf, _ = model(src, shuffled)
    result = {
        "psnr_model": float(psnr(out, tgt).mean()),
        "psnr_copy": float(psnr(src, tgt).mean()),
        "psnr_shuffled": float(psnr(out_shuf, tgt).mean()),
        "pose_head_error_deg": (pred * POSE_SCALE - pose_t).abs().mean(0).tolist(),
    }
    # analysis by synthesis on a subset (it renders ~50 images per sample)
    pick = np.linspace(0, len(poses) - 1, min(abs_samples, len(poses))).round().astype(int)
    out01 = ((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    found_model, found_copy = [], []
    for i in pick:
        found_model.append(toy.best_match_angles(idents[i], out01[i], poses[i]))
        found_copy.append(toy.best_match_angles(idents[i], sources[i], poses[i]))
    truth = np.array(poses)[pick]
    result["abs_error_model"] = np.abs(np.array(found_model) - truth).mean(0).tolist()
    result["abs_error_copy"] = np.abs(np.array(found_copy) - truth).mean(0).tolist()
    result["abs_error_chance"] = _uniform_guess_error(truth).tolist()
    return result


def format_result(r: dict) -> str:
    axes = ("yaw", "pitch", "roll")
    fmt = lambda v: " / ".join(f"{x:.1f}" for x in v)  # noqa: E731
    return (f"PSNR model {r['psnr_model']:.2f} dB, copy {r['psnr_copy']:.2f} dB, shuffled pose "
            f"{r['psnr_shuffled']:.2f} dB; best-match angle error ({'/'.join(axes)}) model {fmt(r['abs_error_model'])} "
            f"deg, copy {fmt(r['abs_error_copy'])}, chance {fmt(r['abs_error_chance'])}; pose head "
            f"{fmt(r['pose_head_error_deg'])}")

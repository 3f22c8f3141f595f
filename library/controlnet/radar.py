"""Radar targets -> pixel positions -> Gaussian heatmaps (the ControlNet's condition in radar mode).

Axis convention (also in --help and docs/train_controlnet.md): an image of W x H pixels shows velocity along x
and range along y, range 0 at the bottom:

    x = (v + vel_max) / (2 * vel_max) * (W - 1)        column, v in [-vel_max, vel_max]
    y = (1 - r / range_max) * (H - 1)                   row,    r in [0, range_max]

Pixel (row i, column j) has its centre at (x=j, y=i). Targets outside the axes are dropped with a
warning. The heatmap is the per-pixel maximum over targets of amplitude * exp(-d^2 / (2 sigma^2)),
sigma in pixels of the image the ControlNet sees (the training resolution, or the generated size),
so the same --heatmap_sigma means the same blob at training and at inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from library.errors import UserError


@dataclass(frozen=True)
class RadarAxes:
    range_max: float = 200.0
    vel_max: float = 40.0

    def __post_init__(self):
        if not (self.range_max > 0 and self.vel_max > 0):
            raise UserError(f"--range_max and --vel_max must be > 0 (got {self.range_max}, {self.vel_max}).",
                            fix="pass the largest range and the largest |velocity| your radar images show.")

    def inside(self, rng: float, vel: float) -> bool:
        return 0.0 <= rng <= self.range_max and -self.vel_max <= vel <= self.vel_max

    def to_pixel(self, rng: float, vel: float, width: int, height: int) -> tuple[float, float]:
        x = (vel + self.vel_max) / (2 * self.vel_max) * (width - 1)
        y = (1.0 - rng / self.range_max) * (height - 1)
        return x, y

    def from_pixel(self, x: float, y: float, width: int, height: int) -> tuple[float, float]:
        """(range, velocity) of a pixel position: the inverse of `to_pixel`."""
        vel = x / (width - 1) * 2 * self.vel_max - self.vel_max
        rng = (1.0 - y / (height - 1)) * self.range_max
        return rng, vel


@dataclass(frozen=True)
class Target:
    range: float
    velocity: float
    amplitude: float = 1.0


def parse_targets(raw, where: str) -> list[Target]:
    """A listing's "targets" value: [{"range": r, "velocity": v, "amplitude": a?}, ...] (or [r, v, a?])."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UserError(f"'targets' in {where} must be a list of {{\"range\", \"velocity\"}} objects.",
                        fix='write e.g. "targets": [{"range": 85.2, "velocity": -12.5}].')
    out = []
    for item in raw:
        try:
            if isinstance(item, dict):
                amp = item.get("amplitude", item.get("amp", 1.0))
                target = Target(float(item["range"]), float(item["velocity"]), float(amp))
            else:
                target = Target(*(float(v) for v in item))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"bad target {item!r} in {where}.",
                            fix='each target needs "range" and "velocity" numbers (and optionally "amplitude").') \
                from None
        if not all(math.isfinite(v) for v in (target.range, target.velocity, target.amplitude)):
            raise UserError(f"target {item!r} in {where} is not finite.", fix="use finite numbers.")
        out.append(target)
    return out


def target_points(targets: list[Target], axes: RadarAxes, size: tuple[int, int], where: str = "",
                  warn=None) -> np.ndarray:
    """[N, 3] (x, y, amplitude) in pixels of an image of `size` = (W, H); outside targets dropped."""
    kept, dropped = [], 0
    for t in targets:
        if axes.inside(t.range, t.velocity):
            kept.append((*axes.to_pixel(t.range, t.velocity, *size), t.amplitude))
        else:
            dropped += 1
    if dropped and warn is not None:
        warn(f"{dropped} target(s) of {where or 'an image'} lie outside range [0, {axes.range_max:g}] x "
             f"velocity [-{axes.vel_max:g}, {axes.vel_max:g}] and are left out (check --range_max / --vel_max).")
    return np.asarray(kept, np.float32).reshape(-1, 3)


def place_points(points: np.ndarray, size: tuple[int, int], resized: tuple[int, int],
                 bucket: tuple[int, int]) -> np.ndarray:
    """Points of an image of `size` after the data library's resize to `resized` and centre crop to
    `bucket` (library.data.transforms.resize_and_crop): pixel centres scale as (x + 0.5) * s - 0.5."""
    out = points.copy()
    (w, h), (rw, rh), (bw, bh) = size, resized, bucket
    out[:, 0] = (points[:, 0] + 0.5) * (rw / w) - 0.5 - (rw - bw) // 2
    out[:, 1] = (points[:, 1] + 0.5) * (rh / h) - 0.5 - (rh - bh) // 2
    return out


def render_heatmap(points: np.ndarray, width: int, height: int, sigma: float) -> np.ndarray:
    """HxW float32 in [0, 1]: max over points of amp * exp(-d^2 / (2 sigma^2))."""
    if sigma <= 0:
        raise UserError(f"--heatmap_sigma must be > 0 (got {sigma}).", fix="pass e.g. --heatmap_sigma 8.")
    heat = np.zeros((height, width), np.float32)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    for x, y, amp in points:
        # separable Gaussian: an outer product instead of a full distance grid per target
        g = np.outer(np.exp(-((ys - y) ** 2) / (2 * sigma**2)), np.exp(-((xs - x) ** 2) / (2 * sigma**2)))
        np.maximum(heat, amp * g, out=heat)
    return np.clip(heat, 0.0, 1.0)


def heatmap_rgb(heat: np.ndarray) -> np.ndarray:
    """HxW -> HxWx3 (the ControlNet input has 3 channels, as every SD ControlNet)."""
    return np.repeat(heat[..., None], 3, axis=2)


def peak_positions(heat: np.ndarray, threshold: float = 0.5) -> list[tuple[float, float]]:
    """Local maxima above `threshold` as (x, y): the target positions read back from a heatmap."""
    padded = np.pad(heat, 1, constant_values=-1.0)
    centre = padded[1:-1, 1:-1]
    neighbours = [padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx]
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    is_peak = (centre >= threshold) & np.all([centre >= n for n in neighbours], axis=0)
    ys, xs = np.nonzero(is_peak)
    return [(float(x), float(y)) for x, y in zip(xs, ys)]

"""Aspect-ratio bucketing: which (width, height) each image is trained at.

Buckets are sizes in multiples of `steps` between `min_reso` and `max_reso` whose area does not
exceed the training resolution's. An image goes to the bucket nearest its aspect ratio, is resized
to cover it and cropped, so little of the picture is lost. Same rules as kohya, so the same
dataset lands in the same buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    bucket: tuple[int, int]   # (w, h) the image is trained at
    resized: tuple[int, int]  # (w, h) the image is resized to before cropping; covers `bucket`
    ar_error: float           # bucket aspect ratio minus image aspect ratio


def bucket_resolutions(resolution: tuple[int, int], min_reso: int, max_reso: int,
                       steps: int) -> list[tuple[int, int]]:
    """All predefined buckets for a training resolution, sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int(area // width // steps) * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size that keeps `size`'s aspect ratio and just covers `bucket`."""
    w, h = size
    bw, bh = bucket
    scale = bh / h if w / h > bw / bh else bw / w  # wider than the bucket: match heights
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


class BucketPlanner:
    """Places images for one dataset; created once per dataset with its settings."""

    def __init__(self, resolution, enable_bucket=False, min_reso=256, max_reso=1024, steps=64,
                 no_upscale=False):
        self.resolution = tuple(resolution)
        self.enabled = enable_bucket
        self.steps = steps
        self.no_upscale = no_upscale
        self.max_area = self.resolution[0] * self.resolution[1]
        self.predefined = bucket_resolutions(self.resolution, min_reso, max_reso, steps) \
            if enable_bucket and not no_upscale else []
        self._predefined_set = set(self.predefined)
        self._ratios = [w / h for w, h in self.predefined]

    def place(self, size: tuple[int, int]) -> Placement:
        w, h = size
        ratio = w / h
        if not self.enabled:
            return Placement(self.resolution, _cover(size, self.resolution), 0.0)
        if not self.no_upscale:
            if size in self._predefined_set:
                bucket = size
            else:
                errors = [abs(r - ratio) for r in self._ratios]
                bucket = self.predefined[errors.index(min(errors))]
            return Placement(bucket, _cover(size, bucket), bucket[0] / bucket[1] - ratio)
        resized = self._no_upscale_size(size)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) == 0:
            raise ValueError(f"image {w}x{h} is smaller than one bucket step ({self.steps} px)")
        return Placement(bucket, resized, bucket[0] / bucket[1] - ratio)

    def _no_upscale_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """With bucket_no_upscale: the image's own size, shrunk to the area limit if larger."""
        w, h = size
        if w * h <= self.max_area:
            return size
        ratio = w / h
        rw = math.sqrt(self.max_area * ratio)
        rh = self.max_area / rw
        # Round one side to steps and derive the other; keep whichever keeps the ratio better.
        bw = _round_to_steps(rw, self.steps)
        bh_for_w = _round_to_steps(bw / ratio, self.steps)
        bh = _round_to_steps(rh, self.steps)
        bw_for_h = _round_to_steps(bh * ratio, self.steps)
        err_w = abs(bw / bh_for_w - ratio) if bh_for_w else math.inf
        err_h = abs(bw_for_h / bh - ratio) if bh else math.inf
        if err_w < err_h:
            return bw, int(bw / ratio + 0.5)
        return int(bh * ratio + 0.5), bh

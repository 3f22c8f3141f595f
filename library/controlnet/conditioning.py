"""Conditioning types: what the ControlNet sees for one training image, and where the loss looks.

A type turns a listing entry into a condition spec (checked before training), renders the spec to
the HxWx3 float array the ControlNet gets (aligned with the training crop of the image), and says
which pixels the weighted loss should emphasise.

    --conditioning_type image          a conditioning image per training image (kohya/diffusers), [0, 1]
    --conditioning_type radar_heatmap  targets (range, velocity) per image, drawn as Gaussians, [0, 1]
    --conditioning_type inpaint        the image with a hole at -1 (library.controlnet.inpaint; COCO
                                       instances from library.controlnet.coco, or random masks)

Extension point: register a class with the same four methods in TYPES (the range of `render` is
the type's business, the trainer passes arrays through unchanged). A type whose condition is drawn
anew for every sample (inpaint) also has `sample(spec, placement, rng) -> (condition, caption)`;
the dataset calls it with a generator seeded from (seed, epoch, batch position, place in batch).
"""
from __future__ import annotations

import numpy as np
import torch

from library.controlnet import radar
from library.errors import UserError


def load_aligned(path: str, image_size: tuple[int, int], placement) -> np.ndarray:
    """A conditioning image resized to its training image's size, then resized and cropped exactly
    as the data library does with the image, as float [0, 1]."""
    import cv2

    from library.data.probe import load_rgb
    from library.data.transforms import resize_and_crop

    arr = np.asarray(load_rgb(path))
    if (arr.shape[1], arr.shape[0]) != tuple(image_size):
        arr = cv2.resize(arr, tuple(image_size), interpolation=cv2.INTER_AREA)
    return resize_and_crop(arr, placement).astype(np.float32) / 255.0


class ImageConditioning:
    name = "image"

    def spec(self, entry: dict, where: str):
        path = entry.get("conditioning")
        if not path:
            raise UserError(f"{where} has no conditioning image.",
                            fix="give every image a conditioning image with the same base name in "
                                "--conditioning_data_dir, or a conditioning_file_name in the listing.")
        return path

    def render(self, spec, image_size: tuple[int, int], placement) -> np.ndarray:
        return load_aligned(spec, image_size, placement)

    def weight_source(self, cond: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] in [0, 1]: the brightest channel (edges, heatmaps, scribbles are bright)."""
        return cond.float().amax(dim=1, keepdim=True).clamp(0, 1)

    def describe(self) -> dict:
        return {"conditioning_type": self.name}


class RadarConditioning(ImageConditioning):
    name = "radar_heatmap"

    def __init__(self, axes: radar.RadarAxes, sigma: float, warn=None):
        if sigma <= 0:
            raise UserError(f"--heatmap_sigma must be > 0 (got {sigma}).", fix="pass e.g. --heatmap_sigma 8.")
        self.axes, self.sigma, self.warn = axes, float(sigma), warn

    def spec(self, entry: dict, where: str):
        # Targets win over a pre-rendered file: then the sigma is ours and matches inference.
        if entry.get("targets") is not None:
            return radar.parse_targets(entry["targets"], where)
        if entry.get("conditioning"):
            return entry["conditioning"]
        raise UserError(f"{where} has neither 'targets' nor a conditioning image.",
                        fix='add "targets": [{"range": ..., "velocity": ...}] (an empty list for no target).')

    def render(self, spec, image_size: tuple[int, int], placement) -> np.ndarray:
        if isinstance(spec, str):
            return load_aligned(spec, image_size, placement)
        points = radar.target_points(spec, self.axes, image_size, warn=self.warn)
        points = radar.place_points(points, image_size, placement.resized, placement.bucket)
        return radar.heatmap_rgb(radar.render_heatmap(points, *placement.bucket, self.sigma))

    def from_targets(self, targets: list[radar.Target], width: int, height: int) -> np.ndarray:
        """Inference: the condition for an image of width x height."""
        points = radar.target_points(targets, self.axes, (width, height), warn=self.warn)
        return radar.heatmap_rgb(radar.render_heatmap(points, width, height, self.sigma))

    def describe(self) -> dict:
        return {"conditioning_type": self.name, "heatmap_sigma": self.sigma,
                "range_max": self.axes.range_max, "vel_max": self.axes.vel_max}


from library.controlnet.inpaint import InpaintConditioning  # noqa: E402 (it needs nothing from here)

TYPES = {"image": ImageConditioning, "radar_heatmap": RadarConditioning, "inpaint": InpaintConditioning}


def from_args(args, warn=None, entries=None):
    """The conditioning type chosen by --conditioning_type, with its settings; `auto` is inpaint with
    an --ann_file, radar when the listing gives targets, else image."""
    kind = args.conditioning_type
    if kind == "auto":
        if getattr(args, "ann_file", None):
            kind = "inpaint"
        else:
            kind = "radar_heatmap" if any(e.get("targets") is not None for e in entries or []) else "image"
    if kind == "inpaint":
        return InpaintConditioning(args.mask_dilation, args.random_mask_prob, args.inpaint_caption,
                                   args.min_mask_area)
    if kind == "radar_heatmap":
        return RadarConditioning(radar.RadarAxes(args.range_max, args.vel_max), args.heatmap_sigma, warn)
    if kind == "image":
        return ImageConditioning()
    raise UserError(f"unknown --conditioning_type {kind!r}.", fix=f"use one of: auto, {', '.join(TYPES)}.")

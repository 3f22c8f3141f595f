"""--log_images_every_n_steps of train_controlnet.py: a few fixed examples generated with the ControlNet
being trained, as one grid in the trackers (TensorBoard tag controlnet/images) and in
<output_dir>/sample/<output_name>_images_<step>.png.

The examples are the first validation images (else the first training images) that share the first
one's bucket, at most EXAMPLES of them. Each has its condition drawn once with a fixed seed (inpaint:
its hole) and its own fixed initial noise, so the grids of a run differ only by what training changed.
One row per example:

    inpaint          image | mask | masked condition | result (the image outside the mask, generated inside)
    radar / image    condition | target image | result

Generation is library.controlnet.inference's (diffusers' ControlNet pipeline on the in-memory models)
with few steps, so logging stays cheap, and it leaves the global RNG alone (a resume stays exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EXAMPLES = 4
STEPS = 20
CFG = 4.0  # inference_controlnet.py's default
TAG = "controlnet/images"


@dataclass
class Example:
    image: np.ndarray      # HxWx3 uint8: the training crop
    condition: np.ndarray  # HxWx3 float: what the ControlNet gets
    caption: str


def fixed_examples(group, seed: int, count: int = EXAMPLES) -> list[Example]:
    """The group's first `count` images of its first image's bucket (one batch needs one size)."""
    from library.data.probe import load_rgb
    from library.data.transforms import resize_and_crop

    images = group.images
    bucket = images[0].placement.bucket
    picked = [k for k, rec in enumerate(images) if rec.placement.bucket == bucket][:count]
    out = []
    for k in picked:
        rec = images[k]
        condition, caption = group.sample(k, np.random.default_rng([int(seed) % (1 << 64), k]))
        image = resize_and_crop(np.asarray(load_rgb(rec.path)), rec.placement)
        out.append(Example(image, condition, rec.caption if caption is None else caption))
    return out


def _uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def grid(kind: str, examples: list[Example], generated: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: one row per example, the columns of the module text."""
    from library.controlnet.inpaint import composite, hole_of

    rows = []
    for example, result in zip(examples, generated):
        if kind == "inpaint":
            cond = torch.from_numpy(np.ascontiguousarray(example.condition)).permute(2, 0, 1)[None]
            hole = hole_of(cond)[0, 0].numpy().astype(bool)  # the training rule for the hole
            mask = np.repeat(hole[..., None], 3, axis=2).astype(np.uint8) * 255
            cells = [example.image, mask, _uint8(example.condition), composite(example.image, result, hole)]
        else:
            cells = [_uint8(example.condition), example.image, _uint8(result)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def log_images(pipe, examples: list[Example], kind: str, seed: int, step: int, trackers, out_dir,
               name: str, clip_skip: int | None = None) -> Path:
    """Generate the examples with `pipe` (library.controlnet.inference.build_pipeline), log the grid
    to `trackers` and write it as a PNG; returns the PNG's path."""
    from library.controlnet.inference import generate, save_png
    from library.training.sampling import KeepRng, log_sample_image

    with KeepRng():
        generated = generate(pipe, [e.caption for e in examples], [e.condition for e in examples],
                             [seed + i for i in range(len(examples))], STEPS, CFG, clip_skip=clip_skip)
    image = grid(kind, examples, generated)
    path = save_png(image, Path(out_dir) / f"{name}_images_{step:06d}.png")
    log_sample_image(trackers, 0, image, step, " | ".join(e.caption for e in examples), tag=TAG)
    return path


class ImageLogger:
    """--log_images_every_n_steps as the loop's sample hooks: `want(epoch, step)` and the call."""

    def __init__(self, args, accelerator, model, controlnet, trainable, examples_from, ctype, vae_dtype,
                 output_dir, offload_vae: bool):
        self.args, self.accelerator, self.model, self.controlnet = args, accelerator, model, controlnet
        self.trainable, self.examples_from, self.ctype, self.vae_dtype = trainable, examples_from, ctype, vae_dtype
        self.output_dir, self.offload_vae = Path(output_dir), offload_vae
        self.every = getattr(args, "log_images_every_n_steps", None)
        self.examples = self.pipe = None  # built at the first grid

    def want(self, epoch, step) -> bool:
        return bool(self.every) and epoch is None and step > 0 and step % self.every == 0

    def __call__(self, epoch, step) -> None:
        # The loop calls this on every process (never under --fast_dev_run); only the main one
        # generates: the others go on and wait for it at the next step's gradient average.
        if not self.accelerator.is_main_process:
            return
        from library.controlnet.inference import build_pipeline
        from library.training.run import to_device

        args, vae = self.args, self.model.vae
        if self.pipe is None:
            self.examples = fixed_examples(self.examples_from, args.seed)
            self.pipe = build_pipeline(self.model, self.controlnet)
        was_training = self.trainable.training
        self.trainable.eval()
        to_device(vae, self.accelerator.device, self.vae_dtype)  # with cached latents it waits on the CPU
        try:
            with self.accelerator.autocast():
                log_images(self.pipe, self.examples, self.ctype.name, args.seed, step, self.accelerator.trackers,
                           self.output_dir / "sample", args.output_name, args.clip_skip)
        finally:
            if self.offload_vae:
                vae.to("cpu")
            self.trainable.train(was_training)

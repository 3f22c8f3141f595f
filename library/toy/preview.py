"""Generate toy-world samples with a stock diffusers pipeline, with a LoRA off and on, side by side.

The pipeline is diffusers' own `StableDiffusionPipeline` around the model as our loader returns
it; the LoRA is applied with networks.lora (kohya's API) so its multiplier can be switched without
reloading. Every image has its own seeded generator, so the same seed gives the same starting noise
at every multiplier and in every pipeline: differences come from the LoRA alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SAMPLE_STEPS = 20


def make_pipeline(model_path):
    """A StableDiffusionPipeline (DDIM sampler) for a base model in either layout."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.models.loading import load_sd_model

    model = load_sd_model(model_path)
    # The training scheduler's config (clip_sample=False, SD1.5 betas) carries over to DDIM.
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_lora(pipe, lora_file, multiplier: float = 1.0):
    """Patch the pipeline's UNet and text encoder with the LoRA file; returns the network."""
    import networks.lora as lora

    network, _ = lora.create_network_from_weights(multiplier, str(lora_file), pipe.vae, pipe.text_encoder,
                                                  pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)
    network.load_weights(str(lora_file))
    network.set_multiplier(multiplier)
    network.eval()
    return network


@torch.no_grad()
def generate(pipe, prompt: str, seeds, guidance: float = 1.0, steps: int = SAMPLE_STEPS,
             size: int = 64) -> np.ndarray:
    """One image per seed as float [N, H, W, 3] in [0, 1]."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(prompt, num_images_per_prompt=len(generators), generator=generators, height=size, width=size,
               num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def display_blocks(image: np.ndarray, block: int = 8, scale: int = 4, iterations: int = 40) -> np.ndarray:
    """A decoded toy image [H, W, 3] in [0, 1], `scale` times larger, with the shape's edge drawn
    smooth instead of as the toy VAE's 8x8 blocks. For display only (the demo picture).

    The toy decoder is a box filter: each 8x8 block holds the mean colour of its pixels, i.e. the
    background mixed with the shape's colour by how much of the block the shape covers. That
    coverage is found per block (projection on shape colour - background), then a sharp mask is
    sought whose block means equal it: back-projection alternated with a blur and a steep
    sigmoid (a smooth, nearly binary shape). Measured on world circles (radius 9-16 px): the
    mask's IoU with the true circle is 0.95-0.98 (the blocks as drawn: ~0.85), 35 ms per image.
    What the shape-and-background model does not explain (a second shape, noise) is added back,
    smoothly enlarged, so nothing is hidden.
    """
    import cv2

    h, w, _ = image.shape
    image = image.astype(np.float32)
    means = image.reshape(h // block, block, w // block, block, 3).mean((1, 3))
    big = (w * scale, h * scale)

    def enlarge(a):
        return cv2.resize(a.astype(np.float32), big, interpolation=cv2.INTER_CUBIC)

    border = np.concatenate([means[0], means[-1], means[1:-1, 0], means[1:-1, -1]])
    background = np.median(border, axis=0)
    diff = means - background
    strength = np.linalg.norm(diff, axis=-1)
    shape_colour = means[np.unravel_index(np.argmax(strength), strength.shape)]
    direction = shape_colour - background
    full = float(direction @ direction)
    if full < 0.05 ** 2:        # nothing stands out from the background: a smooth enlargement
        return np.clip(enlarge(means), 0, 1)
    coverage = np.clip(diff @ direction / full, 0, 1).astype(np.float32)
    residual = means - (background + coverage[..., None] * direction)

    def per_pixel(a):
        return np.repeat(np.repeat(a, block, 0), block, 1)

    mask = cv2.resize(coverage, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(iterations):
        mask = mask + per_pixel(coverage - mask.reshape(h // block, block, w // block, block).mean((1, 3)))
        mask = cv2.GaussianBlur(mask, (0, 0), 1.5)
        mask = 1 / (1 + np.exp(-(mask - 0.5) * 12))
    alpha = np.clip((enlarge(mask) - 0.5) * 3 + 0.5, 0, 1)[..., None]
    out = background + alpha * direction + cv2.resize(residual.astype(np.float32), big, interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0, 1).astype(np.float32)


def side_by_side(rows: list[tuple[str, np.ndarray]], path, scale: int = 3, title: str = "") -> Path:
    """A PNG with one labelled row per (label, images [N, H, W, 3] in [0, 1]), images enlarged
    (nearest neighbour: each pixel shows as it is); `title` is a line of text above the rows."""
    from PIL import Image, ImageDraw

    from library.fileio import atomic_path

    gap, label_h = 4, 14
    title_h = label_h if title else 0
    n, h, w = max(len(images) for _, images in rows), rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    canvas = Image.new("RGB", (n * (w + gap) + gap, title_h + len(rows) * (h + label_h + gap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, gap // 2), title, fill=(90, 90, 90))
    for r, (label, images) in enumerate(rows):
        top = title_h + gap + r * (h + label_h + gap)
        draw.text((gap, top), label, fill=(0, 0, 0))
        for i, image in enumerate(images):
            tile = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
            canvas.paste(tile.resize((w, h), Image.NEAREST), (gap + i * (w + gap), top + label_h))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)

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

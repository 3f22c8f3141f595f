"""Generate pairs: one initial noise, each modality denoised by its own UNet + LoRA, saved side by side.

Each modality runs through diffusers' stock StableDiffusionPipeline (its own UNet, the shared VAE
and text encoder), so what is sampled here is what users get from the saved LoRA files elsewhere.
The initial noise of pair i comes from a CPU generator seeded with seeds[i], the same on every
device; `independent=True` gives modality b the noise of other seeds (the chance baseline of the
structure-agreement measure). Sampling draws from no global RNG, so training resumes exactly.
Guidance is off (scale 1): training is unconditional, or uses one fixed prompt per modality.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from library.fileio import atomic_path


def make_pipelines(model, dual, sampler: str = "ddim") -> list:
    from diffusers import StableDiffusionPipeline

    from library.prompts import make_scheduler

    pipes = []
    for unet in dual.unets:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=unet, scheduler=make_scheduler(sampler, model.noise_scheduler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def initial_noise(seeds, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate_pairs(model, dual, seeds, *, resolution: int, steps: int = 30, device="cpu", dtype=torch.float32,
                   batch_size: int = 8, independent: bool = False, sampler: str = "ddim", progress=None):
    """(images a, images b) as float [N, H, W, 3] in [0, 1]; pair i starts from seeds[i]'s noise."""
    pipes = make_pipelines(model, dual, sampler)
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    shape = (model.unet.config.in_channels, resolution // factor, resolution // factor)
    seeds = [int(s) for s in seeds]
    seeds_b = [s + 1_000_003 for s in seeds] if independent else seeds
    was = [n.training for n in dual.networks]
    for network in dual.networks:
        network.eval()
    out = [[], []]
    try:
        for k in range(0, len(seeds), batch_size):
            for side, chunk in enumerate((seeds[k:k + batch_size], seeds_b[k:k + batch_size])):
                noise = initial_noise(chunk, shape).to(device, dtype)
                hidden = dual.hidden[side].to(device, dtype).expand(len(chunk), -1, -1)
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                    images = pipes[side](prompt_embeds=hidden, latents=noise, num_inference_steps=steps,
                                         guidance_scale=1.0, height=resolution, width=resolution,
                                         output_type="np").images
                out[side].append(np.asarray(images, dtype=np.float32))
            if progress is not None:
                progress(min(k + batch_size, len(seeds)))
    finally:
        for network, training in zip(dual.networks, was):
            network.train(training)
    return np.concatenate(out[0]), np.concatenate(out[1])


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(_uint8(array)).save(tmp, format="PNG")
    return path


def side_by_side(a: np.ndarray, b: np.ndarray, gap: int = 2) -> np.ndarray:
    """[H, W, 3] + [H, W, 3] -> [H, 2W + gap, 3] with a white gap."""
    return np.concatenate([a, np.ones((a.shape[0], gap, 3), a.dtype), b], axis=1)


def grid(images_a: np.ndarray, images_b: np.ndarray, columns: int = 4, gap: int = 4) -> np.ndarray:
    """All pairs side by side, `columns` pairs per row, on white."""
    tiles = [side_by_side(a, b) for a, b in zip(images_a, images_b)]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    canvas = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = tile
    return canvas


def save_pairs(folder, images_a, images_b, modalities, *, separate: bool = False, start: int = 0,
               with_grid: bool = True) -> list[Path]:
    """folder/pair_0000.png (a | b) for each pair and folder/grid.png; with `separate` also
    folder/<a>/0000.png and folder/<b>/0000.png: a new dataset in the --data_dir layout."""
    folder = Path(folder)
    written = []
    for i, (a, b) in enumerate(zip(images_a, images_b), start=start):
        written.append(save_png(side_by_side(a, b), folder / f"pair_{i:04d}.png"))
        if separate:
            written.append(save_png(a, folder / modalities[0] / f"{i:04d}.png"))
            written.append(save_png(b, folder / modalities[1] / f"{i:04d}.png"))
    if with_grid and len(images_a):
        written.append(save_png(grid(images_a, images_b), folder / "grid.png"))
    return written

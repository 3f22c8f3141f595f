"""The display decoder: a smooth picture from the toy model's 8x8 latent output, for people to look at.

The toy VAE (vae.py) decodes each latent pixel into a flat 8x8 block, so every generated 64x64
image is an 8x8 mosaic: a green circle comes out as a blocky smear. SD's real VAE decoder is
instead a learned network that draws the detail an 8x-downsampled latent implies. This module is
that, for the toy world only: a small CNN trained once, on toy-world renders, to map the 8x8 block
means (= the RGB the toy latent holds, exactly) back to the 64x64 render.

It is for display only. It reads the model's output and adds no information the latent lacks
beyond "this is a toy-world picture": statistics (metrics.py) are computed on the model's own
output, and the demo picture shows the raw mosaic beside it.

Built once (tens of CPU seconds) into `.cache/toy-display/<version>/`; the version is DISPLAY_VERSION
plus a hash of the settings and the world's palette, so a changed recipe never reuses old weights.

    decoder = ensure_display_decoder()
    smooth = decode_for_display(decoder, samples)   # float [N, 64, 64, 3] in [0, 1], same shape
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from library.toy import world

DISPLAY_VERSION = 1  # bump when the code changes the weights in a way the settings do not show
BLOCK = 8  # the toy VAE's downsampling factor
REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO / ".cache" / "toy-display"
WEIGHTS = "display_decoder.safetensors"
INFO = "display_decoder.json"


@dataclass(frozen=True)
class DisplayRecipe:
    width: int = 48
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    input_noise: float = 0.02  # std added to the block means: the model's samples are not exact latents
    broad_fraction: float = 0.25  # share of broad content (any colour, several shapes, gradients)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def block_means(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float NHWC images in [0, 1] (64x64) -> NCHW 8x8 block means in [-1, 1]: the toy latent's RGB."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32).permute(0, 3, 1, 2)
    return F.avg_pool2d(x * 2 - 1, BLOCK)


class DisplayDecoder(nn.Module):
    """8x8 RGB -> 64x64 RGB: convolutions at latent resolution, then three x2 pixel-shuffle stages.

    The output is the bilinear upsampling of the input plus a learned correction, so an untrained
    or unsure decoder degrades to a smooth blur, never to invented shapes.
    """

    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        self.conv_in = nn.Conv2d(3, w, 3, padding=1)
        self.body = nn.ModuleList([nn.Conv2d(w, w, 3, padding=1) for _ in range(4)])
        widths = (w, w // 2, w // 4, w // 4)
        self.ups = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1] * 4, 3, padding=1) for i in range(3)])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, latent_rgb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(latent_rgb))
        for i in range(0, len(self.body), 2):  # residual pairs
            h = h + self.body[i + 1](F.silu(self.body[i](h)))
        for up in self.ups:
            h = F.silu(F.pixel_shuffle(up(h), 2))
        base = F.interpolate(latent_rgb, scale_factor=BLOCK, mode="bilinear", align_corners=False)
        return base + self.conv_out(h)


def training_images(count: int, rng: np.random.Generator, broad_fraction: float) -> np.ndarray:
    """Toy-world renders, float [N, 64, 64, 3]: every palette colour and shape, plus broad content."""
    out = np.empty((count, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.float32)
    n_broad = int(round(count * broad_fraction))
    if n_broad:
        out[:n_broad] = world.broad_images(n_broad, seed=int(rng.integers(2**31)), size=world.IMAGE_SIZE)
    colours = list(world.COLOURS)
    for i in range(n_broad, count):
        scene = world.random_scene(rng, colours[rng.integers(len(colours))], world.SHAPES[rng.integers(2)])
        out[i] = world.render(scene)
    return out


def train_display_decoder(recipe: DisplayRecipe = DisplayRecipe(), log=None) -> tuple[DisplayDecoder, dict]:
    """Train from the recipe's seed (one torch thread: tens of seconds); returns (decoder, stats)."""
    log = log or (lambda msg: None)
    rng = np.random.default_rng(recipe.seed)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        decoder = DisplayDecoder(recipe.width)
        opt = torch.optim.AdamW(decoder.parameters(), lr=recipe.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
        start, losses = time.process_time(), []
        for step in range(recipe.steps):
            target = training_images(recipe.batch, rng, recipe.broad_fraction)
            latent = block_means(target)
            latent = latent + recipe.input_noise * 2 * torch.randn_like(latent)
            loss = F.l1_loss(decoder(latent), torch.from_numpy(target).permute(0, 3, 1, 2) * 2 - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 100 == 0 or step == recipe.steps - 1:
                log(f"display decoder step {step + 1}/{recipe.steps}  L1 {np.mean(losses[-50:]):.4f}")
    decoder.eval().requires_grad_(False)
    return decoder, {"final_l1": round(float(np.mean(losses[-50:])), 5),
                     "cpu_seconds": round(time.process_time() - start, 1)}


def version(recipe: DisplayRecipe = DisplayRecipe()) -> str:
    settings = {"recipe": recipe.as_dict(), "colours": world.COLOURS, "image_size": world.IMAGE_SIZE}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"v{DISPLAY_VERSION}-{digest[:10]}"


def ensure_display_decoder(cache_root=None, recipe: DisplayRecipe = DisplayRecipe(), log=None) -> DisplayDecoder:
    """The cached decoder for `recipe`, trained first if missing (once; tens of CPU seconds)."""
    from safetensors.torch import load_file

    from library.fileio import atomic_dir, file_lock, save_safetensors_atomic, write_json_atomic

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(cache_root or CACHE_ROOT) / version(recipe)
    if not (folder / INFO).is_file():
        with file_lock(folder.with_name(f".{folder.name}.lock")):
            if not (folder / INFO).is_file():
                log(f"training the toy display decoder into {folder} (once; under a minute on one CPU thread)")
                decoder, stats = train_display_decoder(recipe, log)
                with atomic_dir(folder) as tmp:
                    save_safetensors_atomic(decoder.state_dict(), tmp / WEIGHTS)
                    write_json_atomic(tmp / INFO, {"version": version(recipe), "recipe": recipe.as_dict(),
                                                   "stats": stats})
    decoder = DisplayDecoder(recipe.width)
    decoder.load_state_dict(load_file(str(folder / WEIGHTS)))
    return decoder.eval().requires_grad_(False)


@torch.no_grad()
def decode_for_display(decoder: DisplayDecoder, images: np.ndarray) -> np.ndarray:
    """The model's 64x64 samples (8x8 mosaics, float NHWC in [0, 1]) -> smooth 64x64 pictures."""
    if images.shape[1] % BLOCK or images.shape[2] % BLOCK:
        raise ValueError(f"display decoding needs sides that are multiples of {BLOCK}, not {images.shape[1:3]}")
    out = decoder(block_means(images))
    return ((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()

"""A tiny frozen base model for the paired toy world (docs/train_dual_unet.md), built once and cached.

Why not the shared toy model (library/toy)? Its VAE downsamples x8: at its 64 px an image is an
8x8 latent, where a 2-3 px vessel is a fraction of a latent pixel and a Sobel map of the latent is
meaningless. This base follows the measured 2(c) recipe instead: 32 px images, a x2 VAE (16x16x4
latents), a UNet with SD's block types at small widths (0.8 M parameters) and a 2-layer CLIP text
encoder (random, frozen; training is unconditional). The VAE learns all three renderings below;
the UNet is pretrained on the world's *neutral* rendering (the same vessels and disc in plain
greys, toy.render_neutral): like a general base, it knows where structures go but neither
modality's look, and each LoRA learns one look. (A base pretrained on both modalities mixed was
tried first: from shared noise it picks one look for both UNets, and 300 LoRA steps overrode that
choice for only 58-69 % of the samples, so the colour statistic could not tell the modalities apart.)

Written as a diffusers folder, so train_dual_unet.py and gen_pairs.py load it exactly like an SD1.5
folder. The cache is .cache/dual_unet_toy/<hash of the recipe>/ (gitignored); a lock makes a
second process wait for the first build.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from library.dual_unet import toy

REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO / ".cache" / "dual_unet_toy"
RECIPE_VERSION = 4  # bump when the code changes the weights in a way the recipe does not show

VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8)
UNET_CONFIG = dict(in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                   layers_per_block=1, cross_attention_dim=32, attention_head_dim=1, norm_num_groups=16)
# (one attention head: 8 heads of 4 channels made CPU attention the largest cost, 1.7x the UNet step)


@dataclass(frozen=True)
class BaseRecipe:
    seed: int = 0
    size: int = 32
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    unet_pairs: int = 1024


def version(recipe: BaseRecipe) -> str:
    text = json.dumps({"v": RECIPE_VERSION, "recipe": asdict(recipe)}, sort_keys=True)
    return f"v{RECIPE_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def _lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(model, params, steps: int, lr: float, loss_of, log, label: str) -> float:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    model.train()
    avg, start = None, time.perf_counter()
    for step in range(steps):
        loss = loss_of(step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  {label} step {step + 1}/{steps}: loss {avg:.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return float(avg)


def pretrain(recipe: BaseRecipe = BaseRecipe(), log=print):
    """(unet, vae, text_encoder, stats), all frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.loading import make_noise_scheduler
    from library.models.tiny import TINY_TEXT_ENCODER
    from library.models.tokenizer import load_clip_tokenizer
    from library.models.text import encode_captions

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**VAE_CONFIG, sample_size=recipe.size)
    unet = UNet2DConditionModel(**UNET_CONFIG, sample_size=recipe.size // 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT_ENCODER, num_hidden_layers=2))).eval()
    text_encoder.requires_grad_(False)  # random and frozen: training is unconditional
    gen = torch.Generator().manual_seed(recipe.seed + 1)

    def vae_loss(step):  # fresh images every step, all three renderings
        n = recipe.vae_batch // 3
        cf, fa = toy.pair_images(n, seed=recipe.seed * 100_003 + step, size=recipe.size)
        grey = toy.neutral_images(recipe.vae_batch - 2 * n, seed=recipe.seed * 100_019 + step, size=recipe.size)
        x = _pixels(np.concatenate([cf, fa, grey]))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + 1e-6 * post.kl().mean()

    stats = {"vae_recon_mse": _fit(vae, list(vae.parameters()), recipe.vae_steps, recipe.vae_lr, vae_loss, log, "vae")}

    def encode(images):
        with torch.no_grad():
            pixels = _pixels(images)
            return torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mode() for i in range(0, len(pixels), 64)])

    latents = encode(toy.neutral_images(recipe.unet_pairs, seed=recipe.seed + 7, size=recipe.size))
    # unit-variance latents over all three renderings (as SD's 0.18215 gives on SD's VAE)
    factor = float(1.0 / torch.cat([latents[:256], encode(np.concatenate(toy.pair_images(128, seed=recipe.seed + 8,
                                                                                   size=recipe.size)))]).std())
    vae.register_to_config(scaling_factor=factor)
    latents = latents * factor
    stats["scaling_factor"] = factor
    scheduler = make_noise_scheduler()
    with torch.no_grad():
        empty = encode_captions(load_clip_tokenizer(), text_encoder, [""])

    def unet_loss(step):
        idx = torch.randint(0, len(latents), (recipe.unet_batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, empty.expand(len(idx), -1, -1)).sample
        return F.mse_loss(pred, noise)

    stats["unet_loss"] = _fit(unet, list(unet.parameters()), recipe.unet_steps, recipe.unet_lr, unet_loss, log, "unet")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return unet, vae, text_encoder, stats


def ensure_toy_base(recipe: BaseRecipe = BaseRecipe(), cache_root=None, log=print) -> Path:
    """The cached base folder for `recipe` (a diffusers folder), built first if missing."""
    from library.fileio import file_lock, write_json_atomic
    from library.models.loading import SDModel, make_noise_scheduler
    from library.models.saving import save_diffusers

    root = Path(cache_root or CACHE_ROOT) / version(recipe)
    folder, info = root / "base", root / "info.json"
    with file_lock(root.with_name(f".{root.name}.lock")):
        if info.is_file():  # written last: the folder is complete
            return folder
        log(f"building the paired toy base into {root} (once; a few minutes on one CPU thread)")
        start = time.perf_counter()
        unet, vae, text_encoder, stats = pretrain(recipe, log)
        # save_diffusers writes atomically (a temporary folder, then a rename)
        save_diffusers(SDModel(tokenizer=None, text_encoder=text_encoder, vae=vae, unet=unet,
                               noise_scheduler=make_noise_scheduler(), v2=False, model_path=str(folder),
                               model_name="dual-toy-base"), folder)
        write_json_atomic(info, {"recipe": asdict(recipe), "version": version(recipe), "stats": stats,
                                 "build_seconds": round(time.perf_counter() - start, 1)})
    return folder

"""The radar toy world for the ControlNet learning tests (one disk per image, drawn where a heatmap says, at 64 px).

A small SD-shaped base trained here once and cached in .cache/controlnet-toy/<recipe hash>/: a x4 VAE
(64 px -> 4x16x16 latents) trained on the toy world's broad random content plus small disks of every
colour (a LoRA can only teach a colour the VAE can draw), a 2-layer 32-wide CLIP text encoder (random,
frozen) and a 2-level UNet trained on "a <colour> circle" images: one small disk on a grey background,
red / blue / yellow, anywhere. Written as a diffusers folder, loaded by the scripts like any SD model.

Radar datasets: the disk's centre is written as a radar target (range, velocity) through the axis
convention of library.controlnet.radar, so the scripts draw the heatmap themselves. Measures: where
the object is (centroid of the colour distance from the grey background), hit rate against the
heatmap peak, and "whiteness" of the object for the LoRA's taught concept ("a sks circle" = white).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from library.controlnet.radar import RadarAxes
from library.fileio import file_lock, write_json_atomic
from library.toy import world

REPO = Path(__file__).resolve().parents[1]
SIZE, RADIUS, MARGIN = 64, 5.0, 8.0
RANGE_MAX, VEL_MAX = 200.0, 40.0
# The base world's colours are world.BASE_COLOURS; the LoRA teaches "a sks circle" = WHITE, a colour
# the base never drew and this small VAE reconstructs well (measured: green and magenta come back
# greyish from it, white as (0.80, 0.75, 0.77)).
COLOURS = {**world.COLOURS, "white": (0.95, 0.95, 0.95)}
NEW_COLOUR = "white"
RECIPE = {"version": 2, "seed": 0, "vae_steps": 500, "vae_batch": 16, "vae_lr": 2e-3, "unet_steps": 800,
          "unet_batch": 16, "unet_lr": 1e-3, "unet_images": 2048, "caption_dropout": 0.1}
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=1, norm_num_groups=16)
# One attention head (diffusers reads attention_head_dim as the number of heads here): 8 heads of 4
# channels made CPU attention the largest cost; one head makes the UNet step 1.7x faster.
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           sample_size=64)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407)


def log(message: str) -> None:
    print(f"[radar toy] {message}", flush=True)


# --- the world ------------------------------------------------------------------------------------

def scene_image(rng: np.random.Generator, colour: str) -> tuple[np.ndarray, tuple[float, float]]:
    grey = float(rng.uniform(0.15, 0.55))
    cx, cy = rng.uniform(MARGIN, SIZE - 1 - MARGIN, 2)
    scene = world.Scene("circle", COLOURS[colour], (grey, grey, grey), float(cx) + 0.5, float(cy) + 0.5,
                        RADIUS)
    return world.to_uint8(world.render(scene, SIZE)), (float(cx), float(cy))


def scenes(count: int, seed: int, colours=world.BASE_COLOURS):
    rng = np.random.default_rng(seed)
    out = [scene_image(rng, colours[i % len(colours)]) + (colours[i % len(colours)],) for i in range(count)]
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def target_of(x: float, y: float) -> dict:
    """The radar target whose pixel (library.controlnet.radar's axes) is (x, y) on a SIZE image."""
    return {"range": (1 - y / (SIZE - 1)) * RANGE_MAX, "velocity": x / (SIZE - 1) * 2 * VEL_MAX - VEL_MAX}


def random_points(count: int, seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [tuple(map(float, rng.uniform(MARGIN, SIZE - 1 - MARGIN, 2))) for _ in range(count)]


def write_radar_dataset(root, count: int, seed: int, colours=world.BASE_COLOURS, word: str | None = None,
                        val: int = 0) -> Path:
    """root/metadata.jsonl + root/images/*.png; the last `val` images are "split": "val"."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, points, names = scenes(count, seed, colours)
    lines = []
    for i, (image, (x, y), colour) in enumerate(zip(images, points, names)):
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"images/{i:05d}.png", "text": f"a {word or colour} circle",
                                 "targets": [target_of(x, y)], "split": "val" if i >= count - val else "train"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --- small listings for the fast tests ---------------------------------------------------------

def disk_image(path, size, centre, radius=4):
    """A red disk on dark grey at `centre` (x, y), saved as a PNG; returns the pixels."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 50, np.uint8)
    img[(yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 <= radius**2] = (230, 30, 30)
    Image.fromarray(img).save(path)
    return img


def radar_listing(root, items, val=()):
    """metadata.jsonl with one disk image per ((w, h), (x, y)) item, its centre as the radar target."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    axes = RadarAxes()
    lines = []
    for i, (size, centre) in enumerate(items):
        disk_image(root / "images" / f"{i}.png", size, centre)
        rng, vel = axes.from_pixel(*centre, *size)
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"target {i}",
                                 "targets": [{"range": rng, "velocity": vel}],
                                 "split": "val" if i in val else "train"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --- measures -------------------------------------------------------------------------------------

def object_map(images: np.ndarray) -> torch.Tensor:
    """[N, H, W]: how far each pixel's colour is from the image's median colour (the plain background),
    5x5-smoothed so that the disk, not a stray pixel, peaks."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    background = x.flatten(1, 2).median(dim=1).values[:, None, None, :]
    dist = (x - background).abs().sum(dim=-1)[:, None]
    return F.avg_pool2d(dist, 5, stride=1, padding=2, count_include_pad=False)[:, 0]


def object_positions(images: np.ndarray) -> np.ndarray:
    """[N, 2] (x, y) of each image's object: the centroid of `object_map` above half its peak, in a
    15 px window around the peak (a plain argmax would sit anywhere on the smoothed disk's plateau)."""
    maps = object_map(images)
    n, h, w = maps.shape
    out = np.zeros((n, 2), np.float32)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for i, m in enumerate(maps):
        peak = int(m.argmax())
        py, px = divmod(peak, w)
        near = ((yy - py).abs() <= 7) & ((xx - px).abs() <= 7)
        weight = torch.clamp(m - 0.5 * m.max(), min=0) * near
        out[i] = [float((weight * xx).sum() / weight.sum()), float((weight * yy).sum() / weight.sum())]
    return out


def hit_rate(images: np.ndarray, points, tol: float) -> tuple[float, float]:
    err = np.linalg.norm(object_positions(images) - np.asarray(points, np.float32), axis=1)
    return float((err <= tol).mean()), float(err.mean())


def chance_hit_rate(tol: float, n: int = 20000, seed: int = 5) -> float:
    a, b = np.asarray(random_points(n, seed)), np.asarray(random_points(n, seed + 1))
    return float((np.linalg.norm(a - b, axis=1) <= tol).mean())


def whiteness(images: np.ndarray) -> float:
    """Mean over images of min(R, G, B) in the 5x5 window at the object: about 0.15 for the base
    world's saturated disks, near 1 for white ones."""
    values = []
    for img, (x, y) in zip(images, object_positions(images).round().astype(int)):
        win = img[max(0, y - 2):y + 3, max(0, x - 2):x + 3].reshape(-1, 3)
        values.append(float(win.min(axis=1).mean()))
    return float(np.mean(values))


# --- the base model ---------------------------------------------------------------------------------

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255.0 if images.dtype == np.uint8 else x) * 2 - 1


def small_disks(count: int, seed: int, size: int = 32) -> np.ndarray:
    """Disks of any colour and radius 3-7 on random greys, float [0, 1]: the VAE must reconstruct the
    world's small objects in every colour, not only the base world's three."""
    rng = np.random.default_rng([seed, 17])
    out = np.empty((count, size, size, 3), np.float32)
    for i in range(count):
        grey = float(rng.uniform(0.1, 0.6))
        scene = world.Scene("circle", tuple(rng.uniform(0, 1, 3)), (grey, grey, grey),
                            *map(float, rng.uniform(4, size - 4, 2)), float(rng.uniform(3, 7)))
        out[i] = world.render(scene, size)
    return out


def _train_vae(vae, r: dict) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=r["vae_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r["vae_lr"], total_steps=r["vae_steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(r["seed"] + 1)
    avg = None
    for step in range(r["vae_steps"]):
        half = r["vae_batch"] // 2
        x = _to_tensor(np.concatenate([world.broad_images(half, seed=r["seed"] * 100_003 + step, size=32),
                                       small_disks(r["vae_batch"] - half, seed=r["seed"] * 100_003 + step)]))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = F.mse_loss(vae.decode(z).sample, x)
        loss = rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = rec.item() if avg is None else 0.95 * avg + 0.05 * rec.item()
    return avg


def _train_unet(unet, vae, text_encoder, tokenizer, scheduler, r: dict) -> float:
    from library.models.text import encode_captions

    images, _, colours = scenes(r["unet_images"], r["seed"] + 7)
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_tensor(images[i:i + 256])).latent_dist.mean
                             for i in range(0, len(images), 256)]) * vae.config.scaling_factor
        captions = sorted({f"a {c} circle" for c in colours} | {""})
        hidden = dict(zip(captions, encode_captions(tokenizer, text_encoder, captions)))
    return fit_toy_unet(unet, scheduler, latents, [f"a {c} circle" for c in colours], hidden, r)


def fit_toy_unet(unet, scheduler, latents, item_captions: list[str], hidden: dict, r: dict) -> float:
    """Pretrain a toy base's UNet (eps-prediction, DDPM noise, caption dropout, one-cycle lr) on
    latents whose captions are item_captions; returns the loss average. Shared by the radar and the
    inpainting bases."""
    opt = torch.optim.AdamW(unet.parameters(), lr=r["unet_lr"], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r["unet_lr"], total_steps=r["unet_steps"], pct_start=0.05)
    gen = torch.Generator().manual_seed(r["seed"] + 2)
    avg = None
    for _ in range(r["unet_steps"]):
        idx = torch.randint(0, len(latents), (r["unet_batch"],), generator=gen)
        drop = torch.rand(r["unet_batch"], generator=gen) < r["caption_dropout"]
        cond = torch.stack([hidden["" if d else item_captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (r["unet_batch"],), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
    return avg


def build_base(out_dir: Path, r: dict = RECIPE) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.loading import SDModel, make_noise_scheduler
    from library.models.saving import save_diffusers
    from library.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(r["seed"])
    vae, unet = AutoencoderKL(**VAE), UNet2DConditionModel(**UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT)).eval().requires_grad_(False)
    t0 = time.perf_counter()
    stats = {"vae_recon_mse": _train_vae(vae.train(), r)}
    vae.eval().requires_grad_(False)
    probe, _, _ = scenes(256, r["seed"] + 3)
    with torch.no_grad():
        std = float(vae.encode(_to_tensor(probe)).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    stats["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scheduler = make_noise_scheduler()
    stats["unet_loss"] = _train_unet(unet.train(), vae, text_encoder, load_clip_tokenizer(), scheduler, r)
    stats["unet_s"] = time.perf_counter() - t0
    model = SDModel(tokenizer=None, text_encoder=text_encoder, vae=vae, unet=unet.eval(), noise_scheduler=scheduler,
                    v2=False, model_path=str(out_dir), model_name="radar-toy")
    save_diffusers(model, out_dir)
    return stats


def cache_root() -> Path:
    return Path(os.environ.get("SDT_TEST_CACHE", REPO / ".cache")) / "controlnet-toy"


def radar_toy_base() -> Path:
    """The cached base (built on first use, a few minutes of one CPU thread)."""
    key = hashlib.sha256(json.dumps([RECIPE, UNET, VAE, TEXT, SIZE, RADIUS], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    folder = cache_root() / key
    model = folder / "model"
    with file_lock(folder.with_name(f".{key}.lock")):  # parallel test workers wait for one build
        if not (folder / "stats.json").is_file():  # written last: the model folder is complete
            log(f"building the base model in {folder} (cached for later runs)")
            stats = build_base(model)
            write_json_atomic(folder / "stats.json", stats)
            log(f"base built: {stats}")
    return model

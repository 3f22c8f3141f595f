"""The demo picture's display of toy samples (library/toy/preview.display_blocks): toy-world circles
that went through the box VAE come back round, their edge where the true edge is, far closer to the
true render than the 8x8 blocks the model's own output shows, and sharper than a bicubic upscale.
(tests/test_toy_preview.py checks the outline's IoU and the speed; this file the edge itself.)"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from library.toy import world
from library.toy.preview import display_blocks
from library.toy.vae import build_toy_vae, images_to_tensor

ANGLES = np.deg2rad(np.arange(0, 360, 10))


def _foreground(images: np.ndarray, scene: world.Scene) -> np.ndarray:
    """Per pixel, how far its colour lies from the background towards the shape's colour (0..1)."""
    bg, fg = np.asarray(scene.background, np.float32), np.asarray(scene.colour, np.float32)
    return ((images - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))


def _edge_radii(fraction: np.ndarray, scene: world.Scene) -> np.ndarray:
    """Along rays from the true centre, the radius where the foreground fraction falls below 1/2."""
    steps = np.arange(0, scene.radius + 12, 0.25)
    xs = scene.cx + np.cos(ANGLES)[:, None] * steps - 0.5  # pixel centres sit at +0.5
    ys = scene.cy + np.sin(ANGLES)[:, None] * steps - 0.5
    size = fraction.shape[0]
    grid = torch.from_numpy(np.stack([xs, ys], -1)[None].astype(np.float32)) / (size - 1) * 2 - 1
    along = F.grid_sample(torch.from_numpy(fraction)[None, None].float(), grid, align_corners=True)[0, 0].numpy()
    return np.array([steps[np.argmax(ray < 0.5)] for ray in along])


def _scores(images: np.ndarray, truth: np.ndarray, scenes) -> dict:
    """Mean over scenes: |error| on pixels within 3 px of the true edge; the spread (std) of the
    drawn edge's radius around the circle (0 = round); its mean distance from the true radius."""
    edge, spread, offset = [], [], []
    yy, xx = np.mgrid[0:truth.shape[1], 0:truth.shape[2]] + 0.5
    for image, true, scene in zip(images, truth, scenes):
        near = np.abs(np.hypot(xx - scene.cx, yy - scene.cy) - scene.radius) < 3
        edge.append(np.abs(image - true)[near].mean())
        radii = _edge_radii(_foreground(image, scene), scene)
        spread.append(radii.std())
        offset.append(np.abs(radii - scene.radius).mean())
    return {"edge_error": float(np.mean(edge)), "radius_spread": float(np.mean(spread)),
            "radius_offset": float(np.mean(offset))}


@pytest.fixture(scope="module")
def circles():
    """Toy-world circles in every palette colour: the true renders and what the box VAE returns."""
    rng = np.random.default_rng(2024)
    scenes = [world.random_scene(rng, colour, "circle") for colour in list(world.COLOURS) * 3]
    truth = np.stack([world.render(s) for s in scenes])
    vae, _ = build_toy_vae(truth[:4])  # the probe only sets the latent scale, which the round trip undoes
    with torch.no_grad():
        latents = vae.encode(images_to_tensor(truth)).latent_dist.mean
        decoded = ((vae.decode(latents).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return scenes, truth, decoded


def _block_means(images: np.ndarray) -> np.ndarray:
    n, h, w, _ = images.shape
    return images.reshape(n, h // 8, 8, w // 8, 8, 3).mean((2, 4))


def test_box_vae_output_is_8x8_blocks_of_the_block_means(circles):
    _, truth, decoded = circles
    blocks = decoded.reshape(len(decoded), 8, 8, 8, 8, 3)
    assert np.abs(blocks - blocks[:, :, :1, :, :1]).max() < 1e-3  # every 8x8 block is flat
    # ... holding the mean colour of the true pixels: what display_blocks starts from.
    assert np.abs(_block_means(decoded) - _block_means(truth)).max() < 2e-3


def test_display_draws_round_circles_where_the_blocks_are_square(circles):
    scenes, truth, decoded = circles
    shown = np.stack([display_blocks(image, scale=4) for image in decoded])
    assert shown.shape == (len(decoded), 256, 256, 3) and shown.min() >= 0 and shown.max() <= 1
    smooth = _scores(np.stack([cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) for image in shown]),
                     truth, scenes)  # compared at the render's size: each 4x4 pixel square averaged
    blocks = _scores(decoded, truth, scenes)
    means = torch.from_numpy(_block_means(decoded)).permute(0, 3, 1, 2)
    bicubic = F.interpolate(means, scale_factor=8, mode="bicubic", align_corners=False).clamp(0, 1)
    bicubic = _scores(bicubic.permute(0, 2, 3, 1).numpy(), truth, scenes)
    print(f"\nnearest blocks {blocks}\nbicubic        {bicubic}\ndisplay        {smooth}")
    assert smooth["radius_spread"] < 0.25 * blocks["radius_spread"]  # round, not a stepped cross
    assert smooth["radius_offset"] < 0.25 * blocks["radius_offset"]  # the edge where the true edge is
    assert smooth["edge_error"] < 0.3 * blocks["edge_error"]
    assert smooth["edge_error"] < 0.3 * bicubic["edge_error"]  # sharp, not a smooth blur


def test_grid_title_line(tmp_path):
    from PIL import Image

    from library.toy.preview import side_by_side

    rows = [("row", np.full((2, 8, 8, 3), 0.5, np.float32))]
    plain = Image.open(side_by_side(rows, tmp_path / "a.png", scale=1))
    titled = Image.open(side_by_side(rows, tmp_path / "b.png", scale=1, title="shown through X"))
    assert titled.height == plain.height + 14
    assert np.asarray(titled)[:14].min() < 200  # the title is drawn
    assert np.array_equal(np.asarray(titled)[14:], np.asarray(plain))  # the rows are unchanged

"""The demo picture draws the toy VAE's 8x8 blocks as round shapes (issue 20: "circles that are round")."""
from __future__ import annotations

import time

import numpy as np

from library.toy import world
from library.toy.preview import display_blocks


def _as_decoded(image: np.ndarray, block: int = 8) -> np.ndarray:
    """What the box-filter toy VAE returns: every 8x8 block filled with its mean colour."""
    h, w, _ = image.shape
    means = image.reshape(h // block, block, w // block, block, 3).mean((1, 3))
    return np.repeat(np.repeat(means, block, 0), block, 1)


def _iou(shown: np.ndarray, scene: world.Scene, scale: int) -> float:
    big = world.Scene(scene.shape, scene.colour, scene.background, scene.cx * scale, scene.cy * scale,
                      scene.radius * scale)
    truth = world._coverage(big, shown.shape[0]) > 0.5
    colour, background = np.asarray(scene.colour), np.asarray(scene.background)
    drawn = np.linalg.norm(shown - background, axis=-1) > 0.5 * np.linalg.norm(colour - background)
    return float((truth & drawn).sum() / (truth | drawn).sum())


def test_decoded_blocks_are_drawn_as_round_circles_quickly():
    rng = np.random.default_rng(5)
    smooth, blocky, seconds = [], [], []
    for colour in ("red", "blue", "yellow", "red", "blue", "yellow"):
        scene = world.random_scene(rng, colour, "circle")
        decoded = _as_decoded(world.render(scene, 64))
        start = time.perf_counter()
        shown = display_blocks(decoded, scale=4)
        seconds.append(time.perf_counter() - start)
        assert shown.shape == (256, 256, 3)
        smooth.append(_iou(shown, scene, 4))
        blocky.append(_iou(np.repeat(np.repeat(decoded, 4, 0), 4, 1), scene, 4))
    assert min(smooth) > 0.92, smooth              # round: close to the true circle's outline
    assert np.mean(smooth) > np.mean(blocky) + 0.05, (smooth, blocky)
    assert np.median(seconds) < 0.25               # the demo's 40 images stay within a few seconds


def test_a_plain_image_is_only_enlarged():
    flat = np.full((64, 64, 3), 0.4, np.float32)
    shown = display_blocks(flat)
    assert shown.shape == (256, 256, 3) and np.allclose(shown, 0.4, atol=1e-4)

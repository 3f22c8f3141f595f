"""The toy world: coloured shapes on plain grey backgrounds, with captions that say what is drawn.

The base model is pretrained on BASE_COLOURS x SHAPES ("a red circle", "a blue square", ...). The
demo and the learning test teach a LoRA a concept the base never drew: "a sks circle" = a GREEN
circle. Backgrounds are neutral grey so that green appears nowhere in the base world, which makes
"how green are the samples" a clean statistic (see metrics.py).

The VAE, in contrast, is trained on `broad_images`: any colour, any size, coloured and gradient
backgrounds. A VAE that had only seen the base world could not reconstruct green (a trap measured
in our earlier experiments), and no LoRA on the UNet could then produce it.

Every function takes a seed or a numpy Generator: the same seed gives the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# RGB in [0, 1]. Green is kept out of the base world on purpose (it is the LoRA's new colour).
COLOURS = {
    "red": (0.85, 0.15, 0.15),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.90, 0.85, 0.15),
    "green": (0.15, 0.80, 0.25),
}
# Two colours: measured, a base pretrained for minutes told red from blue but confused red with
# yellow (one channel apart), so a third base colour only made the base worse. (Yellow stays in the
# palette for other worlds built on this module.)
BASE_COLOURS = ("red", "blue")
SHAPES = ("circle", "square")
NEW_TOKEN = "sks"  # kohya users' habitual rare token; the base never saw it
NEW_COLOUR = "green"
NEW_SHAPE = "circle"
IMAGE_SIZE = 64  # 64 px -> 8x8 latents with SD's x8 VAE: CPU training in minutes


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: tuple  # RGB in [0, 1]
    background: tuple  # RGB in [0, 1]
    cx: float  # centre, pixels
    cy: float
    radius: float  # circle radius / half the square's side, pixels


def caption(word: str, shape: str) -> str:
    """The caption of a scene: "a red circle", or "a sks circle" for the new concept."""
    return f"a {word} {shape}"


def _coverage(scene: Scene, size: int) -> np.ndarray:
    """How much of each pixel the shape covers, 0..1, with a one-pixel soft edge (anti-aliasing).

    Soft edges keep the images band-limited, which the x8 VAE reconstructs far better than hard ones.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - scene.cx, yy - scene.cy
    if scene.shape == "circle":
        outside = np.sqrt(dx * dx + dy * dy) - scene.radius
    elif scene.shape == "square":
        outside = np.maximum(np.abs(dx), np.abs(dy)) - scene.radius
    elif scene.shape == "triangle":  # only in the VAE's broad content: equilateral, circumradius `radius`
        edges = np.maximum(dy, np.maximum(-0.866 * dx - 0.5 * dy, 0.866 * dx - 0.5 * dy))
        outside = edges - scene.radius / 2
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return np.clip(0.5 - outside, 0.0, 1.0)


def render(scene: Scene, size: int = IMAGE_SIZE, background: np.ndarray | None = None) -> np.ndarray:
    """The scene as a float32 HxWx3 image in [0, 1]; `background` replaces the plain one."""
    if background is None:
        background = np.broadcast_to(np.asarray(scene.background, np.float32), (size, size, 3))
    alpha = _coverage(scene, size)[..., None]
    return (background * (1 - alpha) + np.asarray(scene.colour, np.float32) * alpha).astype(np.float32)


def random_scene(rng: np.random.Generator, colour_name: str, shape: str, size: int = IMAGE_SIZE) -> Scene:
    """A world scene: the named colour and shape, random grey background, size and position."""
    grey = float(rng.uniform(0.15, 0.55))
    radius = float(rng.uniform(0.14, 0.25) * size)  # 9..16 px at 64: 1-2 latent pixels
    if shape == "square":
        radius *= 0.88  # similar area to the circle of the same draw
    cx, cy = rng.uniform(radius + 2, size - radius - 2, 2)
    return Scene(shape, COLOURS[colour_name], (grey, grey, grey), float(cx), float(cy), radius)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def world_images(count: int, seed: int, colours=BASE_COLOURS, shapes=SHAPES, word: str | None = None,
                 size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """`count` captioned world images as uint8 [N, H, W, 3] and their captions.

    Colours and shapes cycle so that every (colour, shape) pair is equally frequent; the caption
    names the colour, or `word` when given (for "a sks circle").
    """
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in colours for s in shapes]
    images, captions = [], []
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        images.append(to_uint8(render(random_scene(rng, colour, shape, size), size)))
        captions.append(caption(word or colour, shape))
    return np.stack(images), captions


def new_concept_images(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """The LoRA's training set: green circles captioned "a sks circle"."""
    return world_images(count, seed, colours=(NEW_COLOUR,), shapes=(NEW_SHAPE,), word=NEW_TOKEN, size=size)


def broad_images(count: int, seed: int, size: int = 32) -> np.ndarray:
    """Broad random content for the VAE, float32 [N, H, W, 3] in [0, 1].

    Random background colours (a third with a linear gradient), 1-3 shapes of random colour, size
    and kind, and a little pixel noise. Small crops (32 px) train the fully convolutional VAE 4x
    cheaper than 64 px images and still cover the world's shape sizes.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        bg = np.broadcast_to(rng.uniform(0, 1, 3).astype(np.float32), (size, size, 3)).copy()
        if rng.uniform() < 1 / 3:  # a gradient towards a second colour
            angle = rng.uniform(0, 2 * np.pi)
            t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
            bg = bg * (1 - t) + rng.uniform(0, 1, 3).astype(np.float32) * t
        image = bg
        for _ in range(int(rng.integers(1, 4))):
            radius = float(rng.uniform(1.5, 0.45 * size))
            scene = Scene(str(rng.choice(["circle", "square", "triangle"])), tuple(rng.uniform(0, 1, 3)),
                          (0, 0, 0), float(rng.uniform(0, size)), float(rng.uniform(0, size)), radius)
            image = render(scene, size, background=image)
        image = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
        out[i] = np.clip(image, 0, 1)
    return out


def write_lora_dataset(root, count: int = 16, repeats: int = 10, seed: int = 1000) -> Path:
    """The new concept as a kohya dataset: root/<repeats>_sks circle/ with .png + .txt captions."""
    from PIL import Image

    from library.fileio import atomic_path, write_text_atomic

    folder = Path(root) / f"{repeats}_{NEW_TOKEN} {NEW_SHAPE}"
    folder.mkdir(parents=True, exist_ok=True)
    images, captions = new_concept_images(count, seed)
    for i, (image, text) in enumerate(zip(images, captions)):
        with atomic_path(folder / f"{i:03d}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        write_text_atomic(folder / f"{i:03d}.txt", text + "\n")
    return folder

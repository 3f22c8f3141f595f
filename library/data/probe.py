"""Checking image files before training: every file is decoded once, fully, and dropped.

A file that only fails at step 3,000 wastes a run, so the whole dataset is decoded up front
(in threads: PIL releases the GIL while decoding). Nothing decoded is kept in memory.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def is_image_file(name: str) -> bool:
    # Dot files are skipped: macOS "._photo.jpg" AppleDouble files carry the extension but no image.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def probe_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """Return ((width, height) as displayed, None) for a good image, or (None, reason)."""
    # A truncated file must be an error, never half an image padded with grey.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "ImageFile.LOAD_TRUNCATED_IMAGES must stay False"
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION)
            # JPEG can decode at reduced scale; the whole stream is still read, so truncation shows.
            img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
    except Image.DecompressionBombError:
        return None, "too many pixels for PIL's safety limit (a decompression bomb?)"
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read (corrupt, or another format with an image extension)"
    except OSError as err:
        if "truncated" in str(err):
            return None, "truncated (the file ends before the image data does)"
        return None, f"cannot be decoded ({err})"
    except Exception as err:  # decoders raise assorted errors on garbage input
        return None, f"cannot be decoded ({type(err).__name__}: {err})"
    if w < 1 or h < 1:
        return None, "has no pixels"
    if orientation in ROTATED_ORIENTATIONS:
        w, h = h, w
    return (w, h), None


def probe_images(paths: list[str], workers: int | None = None) -> dict[str, tuple]:
    """Probe many files in parallel; returns {path: (size or None, reason or None)}."""
    if not paths:
        return {}
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 4:
        return {p: probe_image(p) for p in paths}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(probe_image, paths)))


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (PNG 'I;16', 'I', 'F') as 8-bit 'L', scaled: PIL's own convert
    clips them (a 16-bit mid-grey 32768 would become white)."""
    if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return img
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0  # float images are 0-1 or 0-255
    else:
        top = 65535.0 if img.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
    arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)  # 2-D uint8: mode L


def load_rgb(path: str) -> Image.Image:
    """Open an image upright (EXIF orientation applied, as the probe measured it) in RGB; 16-bit
    grayscale is scaled to 8 bits (to_8bit), not clipped."""
    with Image.open(path) as img:
        img.load()
        img = to_8bit(ImageOps.exif_transpose(img))
        return img if img.mode == "RGB" else img.convert("RGB")

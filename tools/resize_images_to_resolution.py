#!/usr/bin/env python
"""Shrink the images of a folder to one or more pixel areas, keeping their aspect ratio
(kohya's tools/resize_images_to_resolution.py; same arguments and file names).

    python tools/resize_images_to_resolution.py src dst --max_resolution 512x512,384x384 --divisible_by 8

Each image is written once per resolution as <name>+<resolution>.jpg (.png with --save_as_png): shrunk
to at most that many pixels (never enlarged), then centre-cropped to sides divisible by --divisible_by.
Other files in the folder (captions) are copied; --copy_associated_files also copies each image's
captions as <name>+<resolution>.<ext>. Unlike kohya's script, each size is made from the original
image (kohya shrinks the previous size again) and the sides keep their orientation.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/resize_images_to_resolution.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# kohya's choices -> library.data.transforms.resize_to names (lanczos4 is PIL's Lanczos there too)
INTERPOLATIONS = {"area": "area", "cubic": "cubic", "lanczos4": "lanczos", "nearest": "nearest", "linear": "linear",
                  "box": "box"}


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize the images of a folder to maximum pixel areas.")
    A.add_config_arguments(parser)
    parser.add_argument("src_img_folder", type=str, help="folder of the images")
    parser.add_argument("dst_img_folder", type=str, help="folder for the resized images")
    parser.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                        help='maximum areas, e.g. "512x512,384x384"')
    parser.add_argument("--divisible_by", type=A.positive_int, default=1, help="make the sides divisible by this")
    parser.add_argument("--interpolation", type=str, default=None, choices=list(INTERPOLATIONS),
                        help="resize method (default: area)")
    parser.add_argument("--save_as_png", action="store_true", help="save as .png instead of .jpg")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="also copy files with the image's name (captions) once per resolution")
    return parser


def parse_areas(text: str) -> list[tuple[str, int]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UserError(f"--max_resolution item {item!r} is not WIDTHxHEIGHT.", fix='write e.g. "512x512,384x384".') \
                from None
        out.append((item, w * h))
    return out


def shrink(arr, max_pixels: int, divisible_by: int, interpolation: str | None):
    """kohya's rule: scale by sqrt(max_pixels / pixels) when larger, then centre-crop to multiples."""
    from library.data.transforms import resize_to

    h, w = arr.shape[:2]
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (h * w))
        h, w = int(h * scale), int(w * scale)
        arr = resize_to(arr, (w, h), interpolation or "area")
    new_h, new_w = h - h % divisible_by, w - w % divisible_by
    top, left = (h - new_h) // 2, (w - new_w) // 2
    return arr[top:top + new_h, left:left + new_w]


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    import numpy as np
    from PIL import Image

    from library.fileio import atomic_path

    src, dst = Path(args.src_img_folder), Path(args.dst_img_folder)
    if not src.is_dir():
        raise UserError("the source folder does not exist.", path=src, fix="pass the folder of the images.")
    areas = parse_areas(args.max_resolution)
    dst.mkdir(parents=True, exist_ok=True)
    method = INTERPOLATIONS.get(args.interpolation) if args.interpolation else None
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            shutil.copy(path, dst / path.name)
            continue
        with Image.open(path) as image:
            original = np.asarray(image.convert("RGB"))
        for name, pixels in areas:
            out = shrink(original, pixels, args.divisible_by, method)
            target = dst / f"{path.stem}+{name}{'.png' if args.save_as_png else '.jpg'}"
            with atomic_path(target) as tmp:
                Image.fromarray(np.ascontiguousarray(out)).save(tmp, format="PNG" if args.save_as_png else "JPEG",
                                                                quality=100)
            print(f"{'resized' if out.shape[0] * out.shape[1] < original.shape[0] * original.shape[1] else 'saved'} "
                  f"{path.name} as {target.name} ({out.shape[1]}x{out.shape[0]})")
        if args.copy_associated_files:
            for other in sorted(src.glob(f"{path.stem}.*")):
                if other.suffix.lower() not in IMAGE_EXTENSIONS:
                    for name, _ in areas:
                        shutil.copy(other, dst / f"{path.stem}+{name}{other.suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

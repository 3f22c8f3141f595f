"""Finding and loading the images of a dataset folder, by the same rules as the training data code."""
from __future__ import annotations

import os
from pathlib import Path

from library.data.probe import is_image_file, load_rgb
from library.errors import UserError


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and its sub-folders with `recursive`), sorted; dot-folders skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"the image folder {folder} does not exist or is not a folder.", path=folder,
                        fix="pass the folder that holds your training images.")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in files if is_image_file(name)]
        if not recursive:
            break
    return sorted(found)


def open_rgb(path: str | os.PathLike):
    """The image upright in RGB, or None with the reason when it cannot be decoded."""
    try:
        return load_rgb(str(path)), None
    except Exception as err:  # PIL raises many types for broken files
        return None, f"{type(err).__name__}: {err}"

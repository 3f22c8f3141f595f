"""Small builders shared by the tests: image folders in kohya's layout, in-process training runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, name: str = "10_sks disk", count: int = 4, size: int = 64,
                       caption: str | None = "a sks disk", caption_ext: str = ".txt", seed: int = 0) -> Path:
    """Coloured disks on plain backgrounds in root/<name>/, each with a caption file."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(20, 80, 3)
        r = rng.integers(size // 6, size // 3)
        cx, cy = rng.integers(r, size - r, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (230, 40, 200)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
        if caption is not None:
            (folder / f"img_{i:03d}{caption_ext}").write_text(caption, encoding="utf-8")
    return folder


def run_train_network(argv: list[str]):
    """Run train_network in this process (a fresh accelerate state each time) and return its result."""
    import train_network
    from library.training.accel import reset_accelerate

    reset_accelerate()
    return train_network.main(argv)


def artifact_recorder(file_name: str):
    """record(key, value) for a learning proof: prints the number and keeps every number recorded so far
    in test-artifacts/<file_name> (rewritten on each call, so a failing test still leaves its numbers)."""
    import json

    numbers: dict = {}
    out = Path(__file__).resolve().parents[1] / "test-artifacts" / file_name

    def record(key, value):
        numbers[key] = value
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(numbers, indent=2))
        print(f"{key}: {value}")

    return record

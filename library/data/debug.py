"""--debug_dataset: what the run would train on, shown without loading a model (kohya's debug_dataset).

    shown = debug_dataset(group, out_dir=Path("out/debug_dataset"), epochs=1)

For every batch of the first `epochs` epochs (in the run's order, with its seed): each image's file,
the caption as the model sees it (prefix/suffix, shuffling, dropout applied) and its bucket size.
With `out_dir`, each image is also saved as the model sees it (resized, cropped, flipped, colour
augmented) as e<epoch>_b<batch>_<item>.png. kohya shows the images in a window instead.
"""
from __future__ import annotations

from pathlib import Path


def debug_dataset(group, out_dir: Path | None = None, epochs: int = 1, print_fn=print) -> int:
    """Print (and save) every item of the first `epochs` epochs; returns the number of items."""
    import numpy as np
    from PIL import Image

    from library.fileio import atomic_path

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    shown = 0
    for epoch in range(epochs):
        dataset = group.epoch_dataset(epoch)
        for b in range(len(dataset)):
            batch = dataset[b]
            images = batch.get("images")
            for k, (path, caption) in enumerate(zip(batch["image_paths"], batch["captions"])):
                size = "" if images is None else f" {images.shape[-1]}x{images.shape[-2]}"
                print_fn(f"epoch {epoch + 1} batch {b + 1}/{len(dataset)} item {k + 1}:{size} {path}\n"
                         f"  caption: {caption!r}")
                if out_dir is not None and images is not None:
                    pixels = ((images[k].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                    with atomic_path(out_dir / f"e{epoch + 1}_b{b + 1:04d}_{k + 1}.png") as tmp:
                        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
                shown += 1
    return shown

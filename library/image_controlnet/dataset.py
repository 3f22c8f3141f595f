"""Torch dataset of (source image, target image, poses) pairs, and image loading.

Images are RGB in [-1, 1] (ArcFace's input range; ImageNet backbones re-normalise inside), resized
to --image_size. The data is expected to be aligned face crops, as InsightFace backbones need.
Front images repeat across many pairs, so the few of them are cached after the first decode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from library.errors import UserError


def load_image(path, size: int) -> torch.Tensor:
    """[3, size, size] float in [-1, 1]; a broken file is a UserError naming it."""
    from PIL import Image

    try:
        from library.data.probe import to_8bit

        with Image.open(path) as img:
            img = to_8bit(img).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32)
    except Exception as err:  # any decoder error is a data problem the user has to fix
        raise UserError(f"cannot read the image {path} ({type(err).__name__}: {err}).", path=path,
                        fix="replace or remove the file; python train_image_controlnet.py --data_dir DIR "
                            "--check_data lists every unreadable image.") from None
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def save_image(tensor: torch.Tensor, path) -> None:
    """Write a [3, H, W] tensor in [-1, 1] as an image file, atomically."""
    from PIL import Image

    from library.fileio import atomic_path

    arr = tensor.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))


class PairDataset(Dataset):
    def __init__(self, pairs, image_size: int, pose_dim: int = 3):
        self.pairs = list(pairs)
        self.size = image_size
        self.pose_dim = pose_dim
        self._front_cache: dict[Path, torch.Tensor] = {}

    def __len__(self):
        return len(self.pairs)

    def _front(self, path: Path) -> torch.Tensor:
        # per worker process; bounded so a huge dataset of unique fronts does not fill memory
        if path not in self._front_cache:
            if len(self._front_cache) > 4096:
                self._front_cache.clear()
            self._front_cache[path] = load_image(path, self.size)
        return self._front_cache[path]

    def __getitem__(self, i):
        p = self.pairs[i]
        return {
            "source": self._front(p.source),
            "target": load_image(p.target, self.size),
            "source_pose": torch.tensor(p.source_pose[:self.pose_dim], dtype=torch.float32),
            "target_pose": torch.tensor(p.target_pose[:self.pose_dim], dtype=torch.float32),
        }

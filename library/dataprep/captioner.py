"""Captions from a vision-language model the user has locally (BLIP, GIT, BLIP-2) through transformers.

The model folder is a transformers folder (config.json, the weights, the processor files), for
example a copy of Salesforce/blip-image-captioning-large. kohya's make_captions.py takes the
original BLIP `.pth` instead; that file is refused with the folder to use (we do not ship BLIP's
own model code: transformers has it). Generation follows kohya's defaults: nucleus sampling with
top_p 0.9, or beam search with --beam_search; captions of 5 to 75 tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError


@dataclass
class GenerationOptions:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    def kwargs(self) -> dict:
        common = {"max_length": self.max_length, "min_length": self.min_length}
        if self.beam_search:
            return {**common, "do_sample": False, "num_beams": self.num_beams}
        return {**common, "do_sample": True, "top_p": self.top_p, "top_k": 0}


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        raise UserError(f"{folder} is a single file; captioning takes a transformers model folder.", path=folder,
                        fix="pass the folder of a transformers captioning model (config.json, weights and "
                            "processor files), e.g. a copy of Salesforce/blip-image-captioning-large. kohya's "
                            "original BLIP .pth is not read.")
    if not (folder / "config.json").is_file():
        raise UserError(f"no captioning model in {folder}: config.json is missing.", path=folder,
                        fix="pass the folder of a transformers captioning model (BLIP, GIT or BLIP-2), "
                            "e.g. a copy of Salesforce/blip-image-captioning-large; nothing is downloaded.")


class Captioner:
    """A captioning model and its processor, loaded from a local folder only."""

    def __init__(self, folder: str | os.PathLike, device: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(folder)
        _check_folder(folder)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"the captioning model in {folder} cannot be loaded ({err}).", path=folder,
                            fix="check that the folder is a complete transformers BLIP/GIT/BLIP-2 model "
                                "(config.json, model weights, preprocessor_config.json, tokenizer files).") from None
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model.to(self.device, dtype).eval()
        self.dtype = dtype
        self.folder = folder

    def caption(self, images: list, options: GenerationOptions) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, **options.kwargs())
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def caption_images(captioner: Captioner, paths: list[Path], options: GenerationOptions,
                   caption_extension: str = ".caption", batch_size: int = 1, progress=None):
    """Caption every readable image and write its caption file atomically.

    Returns (written caption files, [(image, reason)] for images that could not be read).
    """
    from library.dataprep.captions import caption_path, write_caption
    from library.dataprep.images import open_rgb

    written, failed, batch = [], [], []

    def flush():
        for (path, _), text in zip(batch, captioner.caption([img for _, img in batch], options)):
            target = caption_path(path, caption_extension)
            write_caption(target, text)
            written.append(target)
            if progress:
                progress(len(written) + len(failed), len(paths), path, text)
        batch.clear()

    for path in paths:
        image, reason = open_rgb(path)
        if image is None:
            failed.append((path, reason))
            continue
        batch.append((path, image))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return written, failed

"""--cache_text_encoder_outputs: encode each distinct caption once before training, then serve the
hidden states from memory instead of running the text encoder every step.

This is exact only while the text encoder is frozen and the caption of an image cannot change in
ways that cannot be listed up front. Shuffling and tag dropout make too many variants, so they
are refused, as kohya refuses them. Whole-caption dropout (caption_dropout_rate,
caption_dropout_every_n_epochs) only ever yields the caption or "", so the empty caption is
cached too and those options keep working.

The cache is keyed by the processed caption text: batches still carry their captions, and the
trainer looks them up, so order, resume and workers are unaffected.
"""
from __future__ import annotations

from typing import Callable

import torch

from library.errors import UserError


def check_text_encoder_caching_allowed(group) -> None:
    bad = []
    for d in group.datasets:
        for sub in d.subsets:
            on = [n for n in ("shuffle_caption", "enable_wildcard") if getattr(sub, n, False)]
            on += [n for n in ("caption_tag_dropout_rate",) if getattr(sub, n) > 0]
            if on:
                bad.append(f"{sub.name} ({', '.join(on)})")
    if bad:
        raise UserError(
            "--cache_text_encoder_outputs cannot be combined with shuffle_caption, enable_wildcard or "
            "caption_tag_dropout_rate, which give a caption a different text every step; they are set "
            "for: " + "; ".join(sorted(set(bad))) + ".",
            fix="drop --cache_text_encoder_outputs, or turn off --shuffle_caption and "
                "--caption_tag_dropout_rate (and those keys in the dataset config).")


def check_text_encoder_caching(group, train_text_encoder: bool) -> None:
    """All of kohya's refusals for --cache_text_encoder_outputs, before any model is loaded."""
    if train_text_encoder:
        raise UserError(
            "--cache_text_encoder_outputs needs a frozen text encoder, but the network also trains "
            "the text encoder.",
            fix="add --network_train_unet_only (as kohya requires), or drop --cache_text_encoder_outputs.")
    check_text_encoder_caching_allowed(group)


def possible_captions(group) -> list[str]:
    """Every text a batch can carry: each used image's processed caption, plus "" when any
    subset drops whole captions."""
    from library.data.transforms import process_caption

    check_text_encoder_caching_allowed(group)
    texts = set()
    for rec in group.images:
        if rec.repeats <= 0:
            continue
        sub = group.subset_of(rec)
        # Epoch 0 (kohya's epoch 1) drops nothing unless every epoch drops (every_n == 1, "").
        texts.add(process_caption(rec.caption, sub, None, epoch=0))
        if sub.caption_dropout_rate > 0 or sub.caption_dropout_every_n_epochs > 0:
            texts.add("")
    return sorted(texts)


class TextEncoderOutputCache:
    """Hidden states per caption, filled once by `encode(list of captions) -> [B, tokens, dim]`."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], storage_device="cpu"):
        self.encode = encode
        self.storage_device = torch.device(storage_device)
        self.outputs: dict[str, torch.Tensor] = {}
        self.misses = 0  # captions encoded during training: should stay 0

    def __len__(self) -> int:
        return len(self.outputs)

    @torch.no_grad()
    def fill(self, captions: list[str], batch_size: int = 16, progress: bool = True) -> None:
        from tqdm import tqdm

        todo = [c for c in dict.fromkeys(captions) if c not in self.outputs]
        bar = tqdm(total=len(todo), desc="caching text encoder outputs", unit="caption",
                   disable=not progress or not todo)
        for i in range(0, len(todo), max(1, batch_size)):
            chunk = todo[i:i + batch_size]
            hidden = self.encode(chunk).detach().to(self.storage_device)
            for caption, h in zip(chunk, hidden):
                self.outputs[caption] = h.clone()
            bar.update(len(chunk))
        bar.close()

    def lookup(self, captions: list[str], device=None) -> torch.Tensor:
        """Stacked hidden states for a batch's captions; a caption not cached (which the checks
        above rule out) is encoded now and counted in `misses`, never silently wrong."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.outputs]
        if missing:
            self.misses += len(missing)
            self.fill(missing, batch_size=len(missing), progress=False)
        out = torch.stack([self.outputs[c] for c in captions])
        return out if device is None else out.to(device, non_blocking=True)

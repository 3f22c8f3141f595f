"""SDXL's conditioning as SDXL and kohya compute it.

Text: each caption is tokenized by both tokenizers (CLIP ViT-L pads with <|endoftext|>, bigG
with 0); each encoder's penultimate hidden states (no final layer norm) are joined along the
channels, 768 + 1280 = 2048 for the UNet's cross-attention; bigG's pooled output is its last
layer's final-norm state at the first EOS through `text_projection` (kohya's pool_workaround:
transformers' own pooling picks the highest id, which is only the EOS while no token is
above it).

Long captions (--max_token_length 150 / 225) are split into 75-token windows for both encoders
exactly as for SD1/SD2 (library/training/text.py: SD1's rules for ViT-L, SD2's "!"-padding rules
for bigG), the windows' states joined the same way, and the pooled output is the first window's,
as kohya does.

Sizes: the UNet's `time_ids` are (original h, w, crop top, left, target h, w) per image;
`kohya_size_ids` computes them from an image's size and its bucket as kohya's dataset does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SDXLTextConditioning:
    hidden_states: torch.Tensor  # [B, 77 (2 + 75 n with long captions), 768 + 1280]
    pooled: torch.Tensor  # [B, 1280]: bigG's projected EOS state (the UNet's text_embeds)


def tokenize_sdxl(tokenizers, captions: list[str], max_token_length: int | None = None):
    """(ids for ViT-L, ids for bigG): [B, 77] each, or [B, n, 77] windows for long captions."""
    from library.training.text import tokenize  # the windowing SD1/SD2 captions use

    return tuple(tokenize(tok, list(captions), max_token_length) for tok in tokenizers)


def pool_at_first_eos(text_encoder_2, last_hidden_state: torch.Tensor, input_ids: torch.Tensor,
                      eos_token_id: int) -> torch.Tensor:
    """bigG's pooled output: the (final-normed) state at each row's first EOS, projected."""
    first_eos = (input_ids == eos_token_id).int().argmax(dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), first_eos]
    projection = text_encoder_2.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)


def _join_windows(hidden: torch.Tensor, batch: int, windows: int) -> torch.Tensor:
    """[B*n, 77, D] -> [B, 2 + 75 n, D]: first BOS, each window's 75 text states, last final state."""
    if windows == 1:
        return hidden
    width = hidden.shape[1]
    hidden = hidden.reshape(batch, windows, width, hidden.shape[-1])
    text = hidden[:, :, 1:width - 1].reshape(batch, windows * (width - 2), hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], text, hidden[:, -1, -1:]], dim=1)


def encode_sdxl_tokens(text_encoders, input_ids_1: torch.Tensor, input_ids_2: torch.Tensor,
                       eos_token_id: int = 49407, unwrapped_text_encoder_2=None) -> SDXLTextConditioning:
    """Conditioning from ids as `tokenize_sdxl` makes them ([B, 77] or [B, n, 77] each).

    `unwrapped_text_encoder_2`: the model whose `text_projection` to use when text_encoders[1] is
    wrapped (DDP), as kohya passes it.
    """
    te1, te2 = text_encoders
    batch = input_ids_1.shape[0]
    windows = input_ids_1.shape[1] if input_ids_1.dim() == 3 else 1
    ids1 = input_ids_1.reshape(-1, input_ids_1.shape[-1]).to(te1.device)
    ids2 = input_ids_2.reshape(-1, input_ids_2.shape[-1]).to(te2.device)
    out1 = te1(ids1, output_hidden_states=True, return_dict=True)
    out2 = te2(ids2, output_hidden_states=True, return_dict=True)
    hidden1 = _join_windows(out1.hidden_states[-2], batch, windows)
    hidden2 = _join_windows(out2.hidden_states[-2], batch, windows)
    pooled = pool_at_first_eos(unwrapped_text_encoder_2 or te2, out2.last_hidden_state, ids2, eos_token_id)
    pooled = pooled[::windows]  # the first window's, as kohya
    hidden = torch.cat([hidden1, hidden2.to(hidden1.device, hidden1.dtype)], dim=2)
    return SDXLTextConditioning(hidden_states=hidden, pooled=pooled)


def encode_prompts(tokenizers, text_encoders, captions: list[str], max_token_length: int | None = None):
    ids1, ids2 = tokenize_sdxl(tokenizers, captions, max_token_length)
    return encode_sdxl_tokens(text_encoders, ids1, ids2, eos_token_id=tokenizers[1].eos_token_id)


def size_ids(original_sizes_hw, crop_top_lefts, target_sizes_hw, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The UNet's `time_ids` [B, 6]: original (h, w), crop (top, left), target (h, w) per image.

    diffusers' UNet embeds each number with the same sinusoidal embedding kohya computes by hand
    (cos first, 256 channels each in SDXL), so passing these is kohya's `get_size_embeddings`.
    """
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes_hw, crop_top_lefts, target_sizes_hw)]
    return torch.tensor(rows, dtype=dtype, device=device)


def added_cond_kwargs(conditioning: SDXLTextConditioning, time_ids: torch.Tensor) -> dict:
    """The UNet's `added_cond_kwargs` for `text_time` conditioning."""
    return {"text_embeds": conditioning.pooled, "time_ids": time_ids.to(conditioning.pooled.device)}


def kohya_crop_ltrb(bucket_wh, image_wh) -> tuple:
    """kohya's (and Stability AI's preprocessing's) crop box of an image in its bucket.

    The image is fitted inside the bucket keeping its aspect ratio and centred; left/top/right/
    bottom of that box (floats where the fit is fractional). kohya records these numbers, not the
    region its own resize-and-trim keeps.
    """
    bucket_w, bucket_h = bucket_wh
    image_ar = image_wh[0] / image_wh[1]
    if bucket_w / bucket_h > image_ar:  # the bucket is wider: heights match
        resized_w, resized_h = bucket_h * image_ar, bucket_h
    else:
        resized_w, resized_h = bucket_w, bucket_w / image_ar
    left, top = (bucket_w - resized_w) // 2, (bucket_h - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def kohya_size_ids(image_wh, bucket_wh, flipped: bool = False) -> tuple:
    """((orig h, w), (crop top, left), (target h, w)) for one training image, as kohya's dataset.

    `image_wh`: the image file's size; `bucket_wh`: its bucket resolution (the trained size);
    `flipped`: --flip_aug mirrored it (the crop's left is then measured from the right edge).
    """
    left, top, right, _ = kohya_crop_ltrb(bucket_wh, image_wh)
    if flipped:
        left = bucket_wh[0] - right
    return ((int(image_wh[1]), int(image_wh[0])), (int(top), int(left)), (int(bucket_wh[1]), int(bucket_wh[0])))

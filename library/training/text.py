"""Captions -> text-encoder hidden states, as kohya computes them for SD1.x."""
from __future__ import annotations

import torch


def final_layer_norm(text_encoder):
    # transformers 5 dropped the `text_model` level of CLIPTextModel; older versions have it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def tokenize(tokenizer, captions: list[str], max_length: int = 77) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_tokens(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states [B, 77, D]; clip_skip=n takes the n-th layer from the end, then the final norm."""
    if not clip_skip or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def encode_captions(tokenizer, text_encoder, captions, clip_skip=None, device=None) -> torch.Tensor:
    ids = tokenize(tokenizer, captions)
    return encode_tokens(text_encoder, ids.to(device or text_encoder.device), clip_skip)

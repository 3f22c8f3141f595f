"""Captions -> text-encoder hidden states, as kohya computes them for SD1.x / SD2.x.

Default: 77 tokens (BOS, 75 tokens of text, EOS/padding), one encoder pass.

--max_token_length 150 / 225 (kohya's long captions): the caption is tokenized to 152 / 227 ids,
split into 2 / 3 windows of 75 ids, each wrapped in BOS ... EOS to the encoder's 77, encoded
separately (the encoder has only 77 positions), and the hidden states are joined back, keeping
the first window's BOS, every window's 75 text positions and the last window's final state:
1 + 75 * n + 1 = 152 / 227 states for the UNet's cross-attention.
"""
from __future__ import annotations

import torch

WINDOW_TEXT = 75  # text ids per encoder window: the encoder's 77 positions minus BOS and EOS


def final_layer_norm(text_encoder):
    # transformers 5 dropped the `text_model` level of CLIPTextModel; older versions have it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def num_windows(max_token_length: int | None) -> int:
    """1 for the default length (None or 75), 2 for 150, 3 for 225."""
    if not max_token_length or max_token_length <= WINDOW_TEXT:
        return 1
    if max_token_length % WINDOW_TEXT:
        raise ValueError(f"max_token_length must be a multiple of {WINDOW_TEXT}, got {max_token_length}")
    return max_token_length // WINDOW_TEXT


def tokenize(tokenizer, captions: list[str], max_token_length: int | None = None,
             max_length: int = 77) -> torch.Tensor:
    """Ids [B, 77] by default; [B, n, 77] windows for max_token_length 150 (n=2) or 225 (n=3)."""
    n = num_windows(max_token_length)
    if n == 1:
        return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids
    ids = tokenizer(list(captions), padding="max_length", max_length=n * WINDOW_TEXT + 2, truncation=True,
                    return_tensors="pt").input_ids
    return _windows(tokenizer, ids, n)


def _windows(tokenizer, ids: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 75n + 2] ids (BOS, text, EOS, padding) -> [B, n, 77] windows."""
    bos, last = ids[:, :1], ids[:, -1:]  # last: EOS after truncation, else padding
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for k in range(n):
        w = torch.cat([bos, ids[:, 1 + k * WINDOW_TEXT:1 + (k + 1) * WINDOW_TEXT], last], dim=1)
        # With SD2's "!" padding (pad != eos) a window can lack its EOS: kohya ends a window whose
        # text runs to the edge with EOS, and gives an all-padding window an EOS after its BOS.
        # With SD1's padding (pad == eos) both rules change nothing.
        runs_to_edge = (w[:, -2] != eos) & (w[:, -2] != pad)
        w[runs_to_edge, -1] = eos
        w[w[:, 1] == pad, 1] = eos
        windows.append(w)
    return torch.stack(windows, dim=1)


def tokenize_weighted(tokenizer, captions: list[str], max_token_length: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """--weighted_captions: ids laid out as `tokenize` lays them out, with the caption's A1111 weights
    ("(tag:1.2)", library.models.prompt_weights) removed from the text, and a weight per id (1 at BOS, EOS,
    padding): kohya's tokenize_with_weights."""
    from library.models.prompt_weights import tokens_with_weights

    n = num_windows(max_token_length)
    length = n * WINDOW_TEXT + 2 if n > 1 else 77
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, weight_rows = [], []
    for caption in captions:
        ids, weights, _ = tokens_with_weights(tokenizer, caption, length - 2)
        rows.append([bos] + ids + [eos] + [pad] * (length - 2 - len(ids)))
        weight_rows.append([1.0] + weights + [1.0] * (length - 1 - len(weights)))
    ids, weights = torch.tensor(rows, dtype=torch.long), torch.tensor(weight_rows)
    if n == 1:
        return ids, weights
    text = weights[:, 1:1 + n * WINDOW_TEXT].reshape(-1, n, WINDOW_TEXT)
    ones = torch.ones(text.shape[0], n, 1)
    return _windows(tokenizer, ids, n), torch.cat([ones, text, ones], dim=2)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each text position's hidden state by its weight (kohya's encode_tokens_with_weights; no
    mean rescaling in training, unlike sampling). hidden [B, 77, D] with weights [B, 77], or
    [B, 2 + 75n, D] with window weights [B, n, 77]."""
    weights = weights.to(hidden.device, hidden.dtype)
    if weights.dim() == 2:
        return hidden * weights.unsqueeze(-1)
    flat = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
    flat[:, 1:-1] = weights[:, :, 1:-1].reshape(weights.shape[0], -1)
    return hidden * flat.unsqueeze(-1)


def encode_text(tokenizer, text_encoder, captions, max_token_length: int | None = None,
                clip_skip: int | None = None, weighted: bool = False, device=None) -> torch.Tensor:
    """Captions -> hidden states for training: `tokenize` + `encode_tokens`, or with --weighted_captions
    the weighted form."""
    device = device or text_encoder.device
    if not weighted:
        return encode_tokens(text_encoder, tokenize(tokenizer, captions, max_token_length).to(device), clip_skip)
    ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
    return apply_token_weights(encode_tokens(text_encoder, ids.to(device), clip_skip), weights)


def _encode(text_encoder, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if not clip_skip or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def encode_tokens(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states [B, 77, D] for ids [B, 77]; [B, 2 + 75n, D] for windows [B, n, 77].

    clip_skip=n takes the n-th layer from the end, then the final layer norm (kohya's rule),
    in every window.
    """
    if input_ids.dim() == 2:
        return _encode(text_encoder, input_ids, clip_skip)
    b, n, width = input_ids.shape
    hidden = _encode(text_encoder, input_ids.reshape(b * n, width), clip_skip)
    hidden = hidden.reshape(b, n, width, hidden.shape[-1])
    text = hidden[:, :, 1:width - 1].reshape(b, n * (width - 2), hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], text, hidden[:, -1, -1:]], dim=1)


def encode_captions(tokenizer, text_encoder, captions, clip_skip=None, device=None,
                    max_token_length: int | None = None) -> torch.Tensor:
    ids = tokenize(tokenizer, captions, max_token_length)
    return encode_tokens(text_encoder, ids.to(device or text_encoder.device), clip_skip)

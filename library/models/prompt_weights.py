"""A1111-style prompt weighting and long prompts, as kohya's sampling and gen_img.py encode them.

    cond, uncond = weighted_embeddings(tokenizer, text_encoder, ["a (red:1.3) [cube]"], [""], max_chunks=3)

Syntax (AUTOMATIC1111's): `(words)` x1.1, `((words))` x1.21, `[words]` /1.1, `(words:1.5)` x1.5;
`\\(` `\\)` `\\[` `\\]` are literal brackets. Unclosed brackets apply to the end of the prompt.

Length: the prompt's tokens (without BOS/EOS) are cut at 75 x max_chunks; they are encoded in chunks
of 75, each wrapped in BOS ... EOS to the encoder's 77 positions, and the chunks' hidden states are
laid side by side (77 x chunks states, BOS/EOS of every chunk kept: kohya's no_boseos_middle=False).
The prompt and the negative prompt get the same number of chunks (enough for the longer of the two),
so classifier-free guidance can batch them.

Weights multiply each token's hidden state; the whole prompt's states are then rescaled so their
mean is what it was before weighting (kohya's get_weighted_text_embeddings). A prompt without
weights and within 75 tokens comes out exactly as a plain 77-token encoding.
"""
from __future__ import annotations

import re

import torch

CHUNK_TEXT = 75  # text tokens per encoder pass: 77 positions minus BOS and EOS
UP, DOWN = 1.1, 1 / 1.1

_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """'a (red:1.3) cube' -> [('a ', 1.0), ('red', 1.3), (' cube', 1.0)]; neighbours of equal weight merge."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            pieces.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), UP)
        elif tok == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:  # text, a stray ':' or an unmatched closing bracket
            pieces.append([tok, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def tokens_with_weights(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[float], bool]:
    """Token ids (no BOS/EOS) and one weight per token, cut at max_tokens; the bool says it was cut."""
    ids, weights = [], []
    for piece, weight in parse_attention(text):
        # max_length: no need for more, and no transformers warning about sequences over 77
        piece_ids = tokenizer(piece, truncation=True, max_length=max_tokens + 2).input_ids[1:-1]
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    cut = len(ids) > max_tokens
    return ids[:max_tokens], weights[:max_tokens], cut


def _chunks(tokenizer, ids: list[int], n: int) -> torch.Tensor:
    """[n, 77] ids: BOS + 75 text ids (EOS-padded) + EOS per chunk, with kohya's SD2 fixes
    (a chunk whose text runs to its edge ends with EOS; an all-padding chunk has EOS after BOS)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    full = [bos] + ids + [eos] * (CHUNK_TEXT * n + 1 - len(ids))
    rows = []
    for k in range(n):
        row = full[k * CHUNK_TEXT:(k + 1) * CHUNK_TEXT + 2]
        row[0] = bos
        if row[-1] not in (eos, pad):
            row[-1] = eos
        if row[1] == pad:
            row[1] = eos
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def _chunk_weights(weights: list[float], n: int) -> torch.Tensor:
    """[n * 77] weights: each text token's weight at its position, 1 at BOS/EOS/padding."""
    out = torch.ones(n, CHUNK_TEXT + 2)
    for i, w in enumerate(weights):
        out[i // CHUNK_TEXT, 1 + i % CHUNK_TEXT] = w
    return out.reshape(-1)


def weighted_embeddings(tokenizer, text_encoder, prompts: list[str], negatives: list[str] | None = None,
                        clip_skip: int | None = None, max_chunks: int = 3, device=None,
                        warn=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond [B, 77 * chunks, D], uncond or None) for the prompts and their negative prompts."""
    from library.models.text import encode_tokens

    device = device or text_encoder.device
    limit = CHUNK_TEXT * max(1, int(max_chunks))
    texts = list(prompts) + list(negatives or [])
    parsed = [tokens_with_weights(tokenizer, t, limit) for t in texts]
    if any(cut for _, _, cut in parsed) and warn is not None:
        warn(f"a prompt is longer than {limit} tokens and was cut; raise --max_embeddings_multiples for more")
    longest = max(len(ids) for ids, _, _ in parsed)
    n = max(1, min(int(max_chunks), (longest - 1) // CHUNK_TEXT + 1))
    ids = torch.stack([_chunks(tokenizer, p[0], n) for p in parsed]).to(device)  # [T, n, 77]
    weights = torch.stack([_chunk_weights(p[1], n) for p in parsed]).to(device)  # [T, n * 77]
    t = ids.shape[0]
    hidden = encode_tokens(text_encoder, ids.reshape(t * n, -1), clip_skip)
    hidden = hidden.reshape(t, n * ids.shape[-1], hidden.shape[-1])
    if any(w != 1.0 for _, ws, _ in parsed for w in ws):
        before = hidden.float().mean(dim=(-2, -1)).to(hidden.dtype)
        hidden = hidden * weights.to(hidden.dtype).unsqueeze(-1)
        after = hidden.float().mean(dim=(-2, -1)).to(hidden.dtype)
        hidden = hidden * (before / after).unsqueeze(-1).unsqueeze(-1)
    cond = hidden[:len(prompts)]
    return cond, (hidden[len(prompts):] if negatives is not None else None)

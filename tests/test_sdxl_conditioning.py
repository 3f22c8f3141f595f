"""SDXL conditioning: both tokenizers (bigG pads with 0 as open_clip), both encoders' penultimate
states, bigG's pooled output, long captions, and the size/crop ids, against diffusers' SDXL
pipeline and kohya's rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from library.models.sdxl.conditioning import (added_cond_kwargs, encode_prompts, encode_sdxl_tokens,
                                              kohya_crop_ltrb, kohya_size_ids, pool_at_first_eos, size_ids,
                                              tokenize_sdxl)
from library.models.sdxl.loading import load_sdxl_tokenizers
from library.models.sdxl.tiny import build_tiny_sdxl

REF_IDS = json.loads((Path(__file__).parent / "data" / "clip_token_ids.json").read_text(encoding="utf-8"))["ids"]
MOJIBAKE = "mojibake: cafÃ© doesnâ€™t"  # the one input only ftfy itself gets right (see test_tokenizer.py)
BOS, EOS = 49406, 49407
LONG = "photo " * 100  # 100 tokens: windows of 75 and 25 (and an empty third of 225)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, oil painting, detailed"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def tokenizers():
    return load_sdxl_tokenizers()


@pytest.fixture(scope="module")
def pipe(tiny, tokenizers):
    from diffusers import StableDiffusionXLPipeline

    from library.models.loading import make_noise_scheduler

    return StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, text_encoder_2=tiny.text_encoder_2,
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=tiny.unet,
                                     scheduler=make_noise_scheduler())


def test_bigg_tokenizer_pads_with_zero_as_open_clip(tokenizers):
    tok1, tok2 = tokenizers
    assert tok1.get_vocab() == tok2.get_vocab()  # same BPE vocabulary
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (BOS, EOS, 0)  # kohya: pad_token_id = 0
    assert (tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id) == (BOS, EOS, EOS)
    prompts = [p for p in REF_IDS if p != MOJIBAKE]
    ids1, ids2 = tokenize_sdxl(tokenizers, prompts)
    # open_clip.tokenize: [sot] + tokens + [eot], cut to 77 with eot last, then zeros
    assert ids2.tolist() == [REF_IDS[p] + [0] * (77 - len(REF_IDS[p])) for p in prompts]
    # CLIP ViT-L (SDXL's first encoder, as SD1): the same ids, padded with EOS
    assert ids1.tolist() == [REF_IDS[p] + [EOS] * (77 - len(REF_IDS[p])) for p in prompts]
    assert any(len(REF_IDS[p]) == 77 and REF_IDS[p][-1] == EOS for p in prompts)  # a truncated one


def test_long_caption_windows_follow_each_encoders_padding(tokenizers):
    ids1, ids2 = tokenize_sdxl(tokenizers, [LONG, "short"], max_token_length=225)
    assert ids1.shape == ids2.shape == (2, 3, 77)
    assert (ids1[:, :, 0] == BOS).all() and (ids2[:, :, 0] == BOS).all()
    # window 1 of the long caption runs to its edge: both end it with EOS
    assert ids1[0, 0, -1] == EOS and ids2[0, 0, -1] == EOS
    # window 3 is empty: ViT-L is all EOS after BOS; bigG gets BOS EOS 0 0 ... (kohya's rule)
    assert ids1[0, 2, 1:].eq(EOS).all()
    assert ids2[0, 2, 1] == EOS and ids2[0, 2, 2:].eq(0).all()
    # the text ids of the two tokenizers agree; only padding differs
    text = ids1[0, 1, 1:-1]
    assert torch.equal(text[text != EOS], ids2[0, 1, 1:-1][(ids2[0, 1, 1:-1] != EOS) & (ids2[0, 1, 1:-1] != 0)])


def test_conditioning_equals_diffusers_sdxl_pipeline(tiny, tokenizers, pipe):
    with torch.no_grad():
        ours = encode_prompts(tokenizers, (tiny.text_encoder, tiny.text_encoder_2), PROMPTS)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    assert ours.hidden_states.shape == (2, 77, 32 + 64) and ours.pooled.shape == (2, 64)
    assert torch.equal(ours.hidden_states, embeds)
    assert torch.allclose(ours.pooled, pooled, atol=1e-6)


def test_penultimate_states_have_no_final_norm_and_pool_is_at_first_eos(tiny, tokenizers):
    ids1, ids2 = tokenize_sdxl(tokenizers, PROMPTS)
    with torch.no_grad():
        cond = encode_sdxl_tokens((tiny.text_encoder, tiny.text_encoder_2), ids1, ids2)
        out1 = tiny.text_encoder(ids1, output_hidden_states=True)
        out2 = tiny.text_encoder_2(ids2, output_hidden_states=True)
    assert len(out1.hidden_states) == 13 and len(out2.hidden_states) == 33
    assert torch.equal(cond.hidden_states[..., :32], out1.hidden_states[11])  # kohya: hidden_states[11]
    assert torch.equal(cond.hidden_states[..., 32:], out2.hidden_states[31])
    assert not torch.allclose(cond.hidden_states[..., :32], out1.last_hidden_state)
    first_eos = [row.index(EOS) for row in ids2.tolist()]
    by_hand = torch.stack([out2.last_hidden_state[i, j] for i, j in enumerate(first_eos)]) @ \
        tiny.text_encoder_2.text_projection.weight.T
    assert torch.allclose(cond.pooled, by_hand, atol=1e-6)
    assert torch.allclose(cond.pooled, out2.text_embeds, atol=1e-6)
    # EOS is found by id, not as the highest id (transformers' legacy rule)
    ids = ids2.clone()
    ids[:, 3] = EOS  # an earlier EOS: pooling moves there
    pooled = pool_at_first_eos(tiny.text_encoder_2, out2.last_hidden_state, ids, EOS)
    assert torch.allclose(pooled, out2.last_hidden_state[:, 3] @ tiny.text_encoder_2.text_projection.weight.T,
                          atol=1e-6)


def test_long_captions_join_windows_and_pool_the_first(tiny, tokenizers):
    encoders = (tiny.text_encoder, tiny.text_encoder_2)
    ids1, ids2 = tokenize_sdxl(tokenizers, [LONG, "short"], max_token_length=150)
    with torch.no_grad():
        cond = encode_sdxl_tokens(encoders, ids1, ids2)
        windows = [encode_sdxl_tokens(encoders, ids1[:, k], ids2[:, k]) for k in range(2)]
    assert cond.hidden_states.shape == (2, 2 + 75 * 2, 96)
    first, second = windows[0].hidden_states, windows[1].hidden_states
    expected = torch.cat([first[:, :1], first[:, 1:76], second[:, 1:76], second[:, 76:]], dim=1)
    assert torch.equal(cond.hidden_states, expected)
    assert torch.allclose(cond.pooled, windows[0].pooled, atol=1e-6)  # kohya: pool2[::n], the first window


def kohya_timestep_embedding(x: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """The size embedding as kohya's SDXL UNet computes it by hand (cos first, then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_size_ids_embed_as_kohyas_size_embeddings(tiny, pipe):
    ids = size_ids([(1216, 832), (1024, 1024)], [(0, 96), (0, 0)], [(1024, 768), (1024, 1024)])
    assert ids.tolist() == [[1216, 832, 0, 96, 1024, 768], [1024, 1024, 0, 0, 1024, 1024]]
    # diffusers' pipeline builds the same row for the same sizes
    theirs = pipe._get_add_time_ids((1216, 832), (0, 96), (1024, 768), dtype=torch.float32,
                                    text_encoder_projection_dim=64)
    assert torch.equal(theirs[0], ids[0])
    # kohya's get_size_embeddings: each of the 6 numbers embedded, concatenated per image
    dim = tiny.unet.config.addition_time_embed_dim
    kohya = kohya_timestep_embedding(ids.flatten(), dim).reshape(2, 6 * dim)
    ours = tiny.unet.add_time_proj(ids.flatten()).reshape(2, 6 * dim)
    assert torch.allclose(ours, kohya, atol=1e-6)


def test_unet_runs_with_added_cond_kwargs(tiny, tokenizers):
    with torch.no_grad():
        cond = encode_prompts(tokenizers, (tiny.text_encoder, tiny.text_encoder_2), PROMPTS)
        ids = size_ids([(64, 64)] * 2, [(0, 0)] * 2, [(64, 64)] * 2)
        out = tiny.unet(torch.randn(2, 4, 8, 8), 500, cond.hidden_states,
                        added_cond_kwargs=added_cond_kwargs(cond, ids)).sample
        other = tiny.unet(torch.randn(2, 4, 8, 8), 500, cond.hidden_states,
                          added_cond_kwargs=added_cond_kwargs(cond, ids * 2)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, other)  # the size ids reach the UNet


@pytest.mark.parametrize("image_wh, bucket_wh, flipped, expected", [
    # same aspect: no crop
    ((2048, 2048), (1024, 1024), False, ((2048, 2048), (0, 0), (1024, 1024))),
    # wider than the bucket: kohya fits it inside (1024 x 682.67), top = (1024 - 682.67) // 2
    ((1200, 800), (1024, 1024), False, ((800, 1200), (170, 0), (1024, 1024))),
    # taller than the bucket: left = (1024 - 640) // 2 = 192; flipped: 1024 - (192 + 640) = 192
    ((800, 1280), (1024, 1024), False, ((1280, 800), (0, 192), (1024, 1024))),
    ((800, 1280), (1024, 1024), True, ((1280, 800), (0, 192), (1024, 1024))),
    # odd fit: left = (832 - 768.0) // 2 = 32, right 800; flipped 832 - 800 = 32
    ((600, 1000), (832, 1280), False, ((1000, 600), (0, 32), (1280, 832))),
    # uneven: fitted 1022.4 wide, left (1024 - 1022.4) // 2 = 0; flipped: int(1024 - 1022.4) = 1
    ((639, 960), (1024, 1536), False, ((960, 639), (0, 0), (1536, 1024))),
    ((639, 960), (1024, 1536), True, ((960, 639), (0, 1), (1536, 1024))),
])
def test_kohya_size_ids(image_wh, bucket_wh, flipped, expected):
    assert kohya_size_ids(image_wh, bucket_wh, flipped) == expected


def test_kohya_crop_box_fits_inside_the_bucket():
    left, top, right, bottom = kohya_crop_ltrb((1024, 1024), (1200, 800))
    assert (left, right) == (0, 1024) and bottom - top == pytest.approx(1024 * 800 / 1200)

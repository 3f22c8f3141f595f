"""Captions -> hidden states: --max_token_length windows (kohya's chunked CLIP), --clip_skip, and
--cache_text_encoder_outputs (same training as without it)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.data import build_dataset_group, dataset_configs_from_args
from library.data.text_cache import TextEncoderOutputCache, check_text_encoder_caching, possible_captions
from library.errors import UserError
from library.models.tokenizer import load_clip_tokenizer
from library.models.text import encode_tokens, final_layer_norm, tokenize
from tests.data_helpers import make_args, make_folder
from tests.helpers import run_train_network, write_image_folder

LONG = " ".join(f"tag{i}" for i in range(60))  # about 120 tokens: spills into a second window
SHORT = "a photo of a sks disk"


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.tiny import TINY_TEXT_ENCODER

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)).eval()


def kohya_windows(tokenizer, caption: str, max_token_length: int) -> torch.Tensor:
    """kohya's get_input_ids, written out step by step as the reference."""
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids[0]
    out = []
    for i in range(1, max_token_length + 2 - 77 + 2, 75):
        chunk = torch.cat((ids[0:1], ids[i:i + 75], ids[-1:]))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                chunk[-1] = tokenizer.eos_token_id
            if chunk[1] == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id
        out.append(chunk)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("max_len", [150, 225])
def test_windows_match_kohya(kind, max_len):
    tok = load_clip_tokenizer(kind)
    ids = tokenize(tok, [LONG, SHORT, LONG * 3], max_len)
    assert ids.shape == (3, max_len // 75, 77)
    for row, caption in zip(ids, [LONG, SHORT, LONG * 3]):
        assert torch.equal(row, kohya_windows(tok, caption, max_len))
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    # the second window of the long caption continues where the first stopped
    flat = tok(LONG, truncation=True, max_length=max_len + 2).input_ids
    body = flat[76:-1][:75]
    assert len(body) == 75 and ids[0, 1, 1:76].tolist() == body
    assert tokenize(tok, [SHORT]).shape == (1, 77) == tokenize(tok, [SHORT], 75).shape


@pytest.mark.parametrize("max_len,clip_skip", [(150, None), (225, 2)])
def test_chunked_encoding_equals_direct_computation(text_encoder, max_len, clip_skip):
    tok = load_clip_tokenizer("sd1")
    ids = tokenize(tok, [LONG, SHORT], max_len)
    with torch.no_grad():
        hidden = encode_tokens(text_encoder, ids, clip_skip)
        assert hidden.shape == (2, max_len + 2, 32)  # 152 / 227 states, as kohya gives the UNet
        for b in range(2):
            states = []
            for k in range(ids.shape[1]):
                out = text_encoder(ids[b, k][None], output_hidden_states=True)
                h = out[0] if clip_skip is None else final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
                states.append(h[0])
            expected = torch.cat([states[0][:1]] + [s[1:76] for s in states] + [states[-1][76:]])
            torch.testing.assert_close(hidden[b], expected, rtol=1e-5, atol=1e-6)
        # The default length is one plain encoder pass.
        ids77 = tokenize(tok, [SHORT])
        torch.testing.assert_close(encode_tokens(text_encoder, ids77), text_encoder(ids77)[0])


def test_clip_skip_takes_the_nth_layer_from_the_end(text_encoder):
    ids = tokenize(load_clip_tokenizer("sd1"), [SHORT])
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
        skip2 = encode_tokens(text_encoder, ids, 2)
        torch.testing.assert_close(skip2, final_layer_norm(text_encoder)(out.hidden_states[-2]))
        assert not torch.allclose(skip2, encode_tokens(text_encoder, ids, 1))
        torch.testing.assert_close(encode_tokens(text_encoder, ids, 1), out[0])


# --- the text-encoder output cache ---------------------------------------------------------------

def test_cache_lists_every_possible_caption_and_refuses_random_ones(tmp_path):
    make_folder(tmp_path / "t", "2_x", n=2, caption_ext=".caption", captions=["a ||| b", "c"])
    group = build_dataset_group(dataset_configs_from_args(make_args(
        train_data_dir=str(tmp_path / "t"), caption_prefix="p", keep_tokens_separator="|||")))
    assert possible_captions(group) == ["p a, b", "p c"]
    group = build_dataset_group(dataset_configs_from_args(make_args(
        train_data_dir=str(tmp_path / "t"), caption_dropout_every_n_epochs=3)))
    assert possible_captions(group) == ["", "a ||| b", "c"]
    check_text_encoder_caching(group, train_text_encoder=False)
    with pytest.raises(UserError, match="network_train_unet_only"):
        check_text_encoder_caching(group, train_text_encoder=True)
    for flag, value in (("shuffle_caption", True), ("caption_tag_dropout_rate", 0.1)):
        group = build_dataset_group(dataset_configs_from_args(make_args(
            train_data_dir=str(tmp_path / "t"), **{flag: value})))
        with pytest.raises(UserError, match=flag):
            check_text_encoder_caching(group, train_text_encoder=False)


def test_cache_object_fills_once_and_counts_misses():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])

    cache = TextEncoderOutputCache(encode)
    cache.fill(["ab", "", "ab", "abc"], batch_size=2, progress=False)
    assert calls == [["ab", ""], ["abc"]] and len(cache) == 3
    out = cache.lookup(["abc", "ab", "abc"])
    assert out[:, 0, 0].tolist() == [3.0, 2.0, 3.0] and cache.misses == 0 and len(calls) == 2
    cache.lookup(["zzzz"])
    assert cache.misses == 1 and calls[-1] == ["zzzz"]


def _args(model, data, out, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=64", "--network_module=networks.lora", "--network_dim=4", "--learning_rate=1e-3",
            "--seed=3", "--caption_extension=.txt", "--max_data_loader_n_workers=0", *extra]


def test_cached_text_encoder_outputs_train_like_uncached(tiny_model, tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2, caption="a sks disk, " + LONG)
    common = ["--max_train_epochs=2", "--network_train_unet_only", "--max_token_length=150", "--clip_skip=2",
              "--caption_dropout_every_n_epochs=2", "--caption_dropout_rate=0.3", "--train_batch_size=2"]
    lookups = []
    original = TextEncoderOutputCache.lookup

    def spy(self, captions, device=None):
        out = original(self, captions, device)
        lookups.append((list(captions), tuple(out.shape), self.misses))
        return out

    monkeypatch.setattr(TextEncoderOutputCache, "lookup", spy)
    # the trainer would cache these fixed captions on its own: keep the "plain" run uncached
    import library.lora.trainer as trainer

    monkeypatch.setattr(trainer, "text_outputs_cacheable", lambda group: False)
    run_train_network(_args(tiny_model.single_file, data, tmp_path / "plain", *common))
    assert not lookups
    run_train_network(_args(tiny_model.single_file, data, tmp_path / "cached", *common,
                            "--cache_text_encoder_outputs"))
    assert len(lookups) == 4 and all(shape == (2, 152, 32) and misses == 0 for _, shape, misses in lookups)
    assert all(c == "" for caps, _, _ in lookups[2:] for c in caps)  # epoch 2 drops every caption
    a = load_file(str(tmp_path / "plain" / "last.safetensors"))
    b = load_file(str(tmp_path / "cached" / "last.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_cache_refusals_come_before_the_model_loads(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "1_x", count=1)
    missing_model = tmp_path / "no-model.safetensors"  # never reached: the checks come first
    with pytest.raises(UserError, match="network_train_unet_only"):
        run_train_network(_args(missing_model, data, tmp_path / "o", "--cache_text_encoder_outputs"))
    with pytest.raises(UserError, match="shuffle_caption"):
        run_train_network(_args(missing_model, data, tmp_path / "o", "--cache_text_encoder_outputs",
                                "--network_train_unet_only", "--shuffle_caption"))

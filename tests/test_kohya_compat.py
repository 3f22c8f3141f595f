"""kohya sd-scripts / kohya_ss habits that work here unchanged: config files, flags, --network_args.

Each test names the kohya function whose rule it checks (kohya-ss/sd-scripts unless said otherwise).
"""
from __future__ import annotations

import json

import pytest
import toml

from library import args as A
from library.errors import UserError
from tests.helpers import run_train_network, write_image_folder


def _parser():
    import train_network

    return train_network.setup_parser()


# --- --config_file ------------------------------------------------------------------------------

def gui_config(model, data, out) -> dict:
    """A config as kohya_ss writes it for an SD1.5 LoRA (bmaltais/kohya_ss kohya_gui/lora_gui.py,
    config_toml_data: its default values after its filter, which drops "", False, None and 0), with
    this test's paths and sizes. The keys epoch and noise_offset_type are the GUI's own; kohya's script
    ignores them."""
    return {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True,
        "caption_extension": ".txt", "clip_skip": 1, "dynamo_backend": "no", "enable_bucket": True,
        "epoch": 1, "gradient_accumulation_steps": 1, "huber_c": 0.1, "huber_scale": 1, "huber_schedule": "snr",
        "learning_rate": 0.0001, "logging_dir": str(out / "log"), "loss_type": "l2", "lr_scheduler": "cosine",
        "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "max_bucket_reso": 128,
        "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_timestep": 1000, "max_token_length": 75,
        "max_train_steps": 2, "min_bucket_reso": 64, "mixed_precision": "no", "network_alpha": 1,
        "network_args": [], "network_dim": 4, "network_module": "networks.lora", "noise_offset_type": "Original",
        "optimizer_args": [], "optimizer_type": "AdamW", "output_dir": str(out), "output_name": "gui_lora",
        "persistent_data_loader_workers": 1, "pretrained_model_name_or_path": str(model), "prior_loss_weight": 1,
        "resolution": "64,64", "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_model_as": "safetensors",
        "save_precision": "fp16", "sdpa": True, "seed": 7, "text_encoder_lr": [5e-05, 5e-05],
        "train_batch_size": 1, "train_data_dir": str(data), "unet_lr": 0.0001, "wandb_run_name": "gui_lora",
    }


def test_a_kohya_ss_gui_config_runs_and_lists_the_ignored_keys_once(tiny_model, tmp_path, capsys):
    """kohya's read_config_from_file loads any key and takes values as they are: an int for a flag
    (persistent_data_loader_workers = 1), a list for text_encoder_lr (nargs="*", the first value for SD1's
    one text encoder, as train_network.py's "toml backward compatibility" branch)."""
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    out = tmp_path / "out"
    cfg = tmp_path / "config_lora-20260101-000000.toml"
    cfg.write_text(toml.dumps(gui_config(tiny_model.single_file, data, out)), encoding="utf-8")
    run_train_network(["--config_file", str(cfg)])
    assert (out / "gui_lora.safetensors").is_file()
    err = capsys.readouterr().err
    assert err.count("has keys that are ignored") == 1
    assert "kohya options this script does not use: epoch, noise_offset_type" in err
    args = A.parse_args(_parser(), ["--config_file", str(cfg)])
    assert args.persistent_data_loader_workers is True and args.text_encoder_lr == [5e-05, 5e-05]
    assert args.network_args == [] and args.resolution == (64, 64)


def test_config_file_gets_toml_added_like_kohya(tmp_path):
    """read_config_from_file: config_path = args.config_file + ".toml" when it does not end in .toml."""
    (tmp_path / "settings.toml").write_text("network_dim = 12\n", encoding="utf-8")
    args = A.parse_args(_parser(), ["--config_file", str(tmp_path / "settings")])
    assert args.network_dim == 12


def test_output_config_adds_toml_like_kohya(tmp_path):
    with pytest.raises(SystemExit):
        A.parse_args(_parser(), ["--network_dim=6", "--config_file", str(tmp_path / "out_cfg"), "--output_config"])
    assert "network_dim = 6" in (tmp_path / "out_cfg.toml").read_text(encoding="utf-8")


def test_a_typo_is_ignored_as_kohya_does_but_named_with_a_suggestion(tmp_path, capsys):
    """kohya (read_config_from_file) puts every key into the namespace, so a typo is silently unused
    there; here it is ignored too, and said once with the flag it probably meant."""
    f = tmp_path / "typo.toml"
    f.write_text('network_dimm = 8\nlearning_rate = 0.5\n[extra]\nmy_own_key = "x"\n', encoding="utf-8")
    args = A.parse_args(_parser(), ["--config_file", str(f)])
    assert args.network_dim == 4 and args.learning_rate == 0.5
    err = capsys.readouterr().err
    assert "unknown key 'network_dimm' (did you mean 'network_dim'?)" in err
    assert "unknown key 'my_own_key'" in err


@pytest.mark.parametrize("value, expected", [(1, True), (0, False), ("true", True), ("false", False),
                                             ([True], True), (True, True)])
def test_flag_values_are_read_by_their_truth(tmp_path, value, expected):
    """kohya tests a flag's value for truth (`if args.cache_latents:`) whatever its type: 1 is true,
    0 false. A string is read by its meaning here ("false" is false), where kohya takes any non-empty
    string as true (docs/kohya_compat.md)."""
    f = tmp_path / "b.toml"
    f.write_text(toml.dumps({"cache_latents": value}), encoding="utf-8")
    assert A.parse_args(_parser(), ["--config_file", str(f)]).cache_latents is expected


def test_one_element_list_for_a_single_value_and_a_longer_one_refused(tmp_path):
    f = tmp_path / "l.toml"
    f.write_text("learning_rate = [0.25]\n", encoding="utf-8")
    assert A.parse_args(_parser(), ["--config_file", str(f)]).learning_rate == 0.25
    f.write_text("learning_rate = [0.25, 0.5]\n", encoding="utf-8")
    with pytest.raises(UserError, match="takes one value"):
        A.parse_args(_parser(), ["--config_file", str(f)])


def test_builtin_presets_run_on_kohyas_script():
    """Our GUI presets, read as kohya's read_config_from_file reads them (one level of [sections] merged
    into the namespace): every key is a kohya train_network.py flag or [preset] bookkeeping that no kohya
    flag shares; network_module is given (kohya's default is None, train_network.py imports it);
    log_with tensorboard comes with a logging_dir (kohya's prepare_accelerator raises without one)."""
    from pathlib import Path

    from library.kohya_flags import TRAIN_NETWORK_FLAGS

    files = sorted((Path(__file__).resolve().parents[1] / "gui" / "builtin_presets" / "train_network").glob("*.toml"))
    assert files
    for path in files:
        table = toml.loads(path.read_text(encoding="utf-8"))
        flat = {}
        for key, value in table.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        bookkeeping = set(table.get("preset", {}))
        assert not bookkeeping & TRAIN_NETWORK_FLAGS, path
        assert set(flat) - bookkeeping <= TRAIN_NETWORK_FLAGS, (path, set(flat) - bookkeeping - TRAIN_NETWORK_FLAGS)
        assert flat.get("network_module"), path
        assert flat.get("log_with") not in ("tensorboard", "all") or flat.get("logging_dir"), path


# --- --text_encoder_lr, --network_alpha, --network_args ------------------------------------------

def test_text_encoder_lr_takes_one_value_per_text_encoder():
    """kohya train_network.py setup_parser: --text_encoder_lr has nargs="*"."""
    p = _parser()
    assert A.parse_args(p, ["--text_encoder_lr", "1e-5", "2e-5"]).text_encoder_lr == [1e-5, 2e-5]
    assert A.parse_args(_parser(), ["--text_encoder_lr", "1e-5"]).text_encoder_lr == [1e-5]


def test_network_alpha_zero_is_accepted_and_means_rank():
    """kohya's LoRAModule: `alpha = self.lora_dim if alpha is None or alpha == 0 else alpha`."""
    import torch

    from networks.lora import LoRAModule

    args = A.parse_args(_parser(), ["--network_alpha", "0"])
    assert args.network_alpha == 0
    module = LoRAModule("lora_unet_x", torch.nn.Linear(8, 8), multiplier=1.0, lora_dim=4, alpha=args.network_alpha)
    assert float(module.alpha) == 4.0 and module.scale == 1.0


def test_network_args_are_key_value_strings_as_kohya_passes_them():
    """kohya train_network.py (prepare network): `key, value = net_arg.split("=", 1)`, value a string."""
    kwargs = A.parse_kv_list(["conv_dim=4", "block_dims=2, 4,4", "algo=lora", "weights=a=b"], "--network_args")
    assert kwargs == {"conv_dim": "4", "block_dims": "2, 4,4", "algo": "lora", "weights": "a=b"}
    with pytest.raises(UserError, match="key=value"):
        A.parse_kv_list(["conv_dim"], "--network_args")


def test_networks_lora_converts_string_network_args_as_kohya(tiny_model):
    """kohya networks/lora.py create_network: conv_dim = int(conv_dim), conv_alpha = float(conv_alpha),
    block_dims a comma-separated string of 25 ranks."""
    from library.models.loading import load_sd_model
    from networks import lora

    model = load_sd_model(tiny_model.single_file)
    dims = ",".join(["2"] * 25)
    kwargs = A.parse_kv_list(["conv_dim=3", "conv_alpha=1.5", f"block_dims={dims}"], "--network_args")
    net = lora.create_network(1.0, 4, 0, model.vae, model.text_encoder, model.unet, **kwargs)
    convs = [m for m in net.unet_loras if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3]
    assert convs and all(m.lora_dim == 3 and float(m.alpha) == 1.5 for m in convs)
    linears = [m for m in net.unet_loras if m.lora_down.weight.dim() == 2]
    assert linears and all(m.lora_dim == 2 for m in linears)


# --- sample prompts: options, seeds, weighting, long prompts -------------------------------------

def test_prompt_options_are_case_insensitive_as_kohya():
    """kohya's line_to_prompt_dict matches each option with re.IGNORECASE."""
    from library.prompts import parse_prompt_line

    p = parse_prompt_line("a cat --W 640 --H 320 --N blurry --S 12 --L 4.5 --D 9 --SS Euler_A")
    assert (p.prompt, p.width, p.height, p.negative, p.steps, p.scale, p.seed, p.sampler) == \
        ("a cat", 640, 320, "blurry", 12, 4.5, 9, "euler_a")


@pytest.fixture(scope="module")
def tiny_sd(tiny_model):
    from library.models.loading import load_sd_model

    return load_sd_model(str(tiny_model.single_file))


def test_a_sample_prompt_without_d_gets_a_random_seed_and_training_rng_is_untouched(tiny_sd, tmp_path):
    """kohya's sample_image_inference: `if seed is not None: torch.manual_seed(seed) else: torch.seed()`,
    inside sample_images_common, which saves and restores the RNG state."""
    import torch

    from library.prompts import SamplePrompt
    from library.training.sampling import generate_samples

    m = tiny_sd
    prompt = [SamplePrompt("a disk", width=64, height=64, steps=1, scale=3.0)]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    seeds = set()
    for k in range(3):
        files = generate_samples(unet=m.unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                 base_scheduler=m.noise_scheduler, prompts=prompt, sampler="ddim",
                                 out_dir=tmp_path / str(k), name_prefix="s", device="cpu")
        seeds.add(files[0].stem.rsplit("_", 1)[1])
    assert len(seeds) == 3  # one fixed seed would give the same name three times
    assert torch.equal(torch.get_rng_state(), state)


def test_attention_syntax_matches_kohyas_documented_examples():
    """Examples from the docstring of kohya's parse_prompt_attention (library/lpw_stable_diffusion.py)."""
    from library.models.prompt_weights import parse_attention

    def rounded(parts):
        return [(t, round(w, 6)) for t, w in parts]

    assert rounded(parse_attention("normal text")) == [("normal text", 1.0)]
    assert rounded(parse_attention("an (important) word")) == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert rounded(parse_attention("(unbalanced")) == [("unbalanced", 1.1)]
    assert rounded(parse_attention("\\(literal\\]")) == [("(literal]", 1.0)]
    assert rounded(parse_attention("(unnecessary)(parens)")) == [("unnecessaryparens", 1.1)]
    assert rounded(parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")) == [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]


def test_unweighted_short_prompt_is_the_plain_encoding(tiny_sd):
    import torch

    from library.models.prompt_weights import weighted_embeddings
    from library.models.text import encode_captions

    m = tiny_sd
    cond, uncond = weighted_embeddings(m.tokenizer, m.text_encoder, ["a red cube"], ["blurry"], clip_skip=2)
    assert torch.equal(cond, encode_captions(m.tokenizer, m.text_encoder, ["a red cube"], 2))
    assert torch.equal(uncond, encode_captions(m.tokenizer, m.text_encoder, ["blurry"], 2))


def test_weights_scale_token_states_then_restore_the_mean(tiny_sd):
    """kohya's get_weighted_text_embeddings: states x weight per token, then x (mean before / mean after)."""
    import torch

    from library.models.prompt_weights import weighted_embeddings
    from library.models.text import encode_captions

    m = tiny_sd
    plain = encode_captions(m.tokenizer, m.text_encoder, ["a red cube"])
    weighted, _ = weighted_embeddings(m.tokenizer, m.text_encoder, ["a (red:1.5) cube"])
    red = m.tokenizer("a").input_ids[1:-1].__len__() + 1  # position of "red" after BOS
    w = torch.ones(77)
    w[red:red + len(m.tokenizer("red").input_ids[1:-1])] = 1.5
    expected = plain * w[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_long_prompts_are_encoded_in_75_token_chunks_up_to_three(tiny_sd):
    """kohya's get_weighted_text_embeddings with max_embeddings_multiples=3 (its sampling default):
    chunks of BOS + 75 tokens + EOS, encoded apart and laid side by side; the negative prompt gets
    as many chunks as the prompt."""
    import torch

    from library.models.prompt_weights import weighted_embeddings
    from library.models.text import encode_tokens

    m = tiny_sd
    words = ", ".join(["a red cube", "a blue ball", "green grass"] * 10)  # over 75 tokens
    ids = m.tokenizer(words).input_ids[1:-1]
    assert 75 < len(ids) <= 150
    cond, uncond = weighted_embeddings(m.tokenizer, m.text_encoder, [words], [""], max_chunks=3)
    assert cond.shape[1] == uncond.shape[1] == 154
    bos, eos = m.tokenizer.bos_token_id, m.tokenizer.eos_token_id
    second = [bos] + ids[75:] + [eos] * (76 - len(ids[75:]))
    assert torch.equal(cond[:, 77:], encode_tokens(m.text_encoder, torch.tensor([second])))
    one, _ = weighted_embeddings(m.tokenizer, m.text_encoder, [words], [""], max_chunks=1)
    assert one.shape[1] == 77  # cut at 75 tokens, as kohya's gen_img default (max_embeddings_multiples 1)


def test_gen_img_reads_weights_and_long_prompts(tiny_model, tmp_path):
    """kohya's gen_img.py encodes prompts with get_weighted_text_embeddings: (tag:1.0) is the plain
    tag, (tag:1.5) changes the image; --max_embeddings_multiples (default 1) admits longer prompts."""
    import numpy as np
    from PIL import Image

    import gen_img

    def image(name, prompt, *extra):
        out = tmp_path / name
        gen_img.main(["--ckpt", str(tiny_model.diffusers_dir), "--outdir", str(out), "--W", "64", "--H", "64",
                      "--steps", "2", "--seed", "3", "--prompt", prompt, *extra])
        (path,) = out.glob("*.png")
        return np.asarray(Image.open(path).convert("RGB"))

    plain = image("plain", "a red cube")
    assert np.array_equal(image("one", "a (red:1.0) cube"), plain)
    assert not np.array_equal(image("heavy", "a (red:1.5) cube"), plain)
    long_prompt = "a red cube, " * 30 + "on grass"  # the last words lie past 75 tokens
    cut = image("cut", long_prompt)
    assert np.array_equal(image("cut_same", long_prompt.replace("on grass", "in snow")), cut)
    assert not np.array_equal(image("long", long_prompt, "--max_embeddings_multiples", "3"), cut)


# --- flags: metadata, state pruning, weighted captions, schedule-free, huber, initial step, logging --

def _train_args(model, data, out, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=64", "--network_dim=4", "--train_batch_size=1", "--learning_rate=1e-3", "--seed=7",
            "--caption_extension=.txt", "--max_data_loader_n_workers=0", *extra]


def test_metadata_flags_state_pruning_and_weighted_captions_in_one_run(tiny_model, tmp_path):
    """kohya's get_sai_model_spec (--metadata_* -> modelspec.*, a thumbnail file as a data: URL,
    encoder_layer from --clip_skip); save_and_remove_state_on_epoch_end (--save_last_n_epochs_state
    prunes the state folders, the model files follow --save_last_n_epochs); --weighted_captions."""
    from PIL import Image

    from library.training.metadata import read_metadata

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=2, caption="a (sks:1.3) disk")
    out = tmp_path / "out"
    thumb = tmp_path / "thumb.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(thumb)
    run_train_network(_train_args(
        tiny_model.single_file, data, out, "--max_train_epochs=4", "--save_every_n_epochs=1", "--save_state",
        "--save_last_n_epochs=3", "--save_last_n_epochs_state=1", "--weighted_captions", "--clip_skip=2",
        "--metadata_title=My LoRA", "--metadata_author=me", "--metadata_description=disks",
        "--metadata_license=CC0", "--metadata_tags=disk,pink", "--metadata_trigger_phrase=sks",
        "--metadata_usage_hint=weight 0.8", f"--metadata_thumbnail={thumb}"))
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == \
        ["last-000001.safetensors", "last-000002.safetensors", "last-000003.safetensors", "last.safetensors"]
    assert [n for n in names if n.endswith("-state")] == ["last-000003-state", "last-state"]
    meta = read_metadata(out / "last.safetensors")
    assert {k: meta[f"modelspec.{k}"] for k in ("title", "author", "description", "license", "tags",
                                                 "trigger_phrase", "usage_hint", "encoder_layer")} == \
        {"title": "My LoRA", "author": "me", "description": "disks", "license": "CC0", "tags": "disk,pink",
         "trigger_phrase": "sks", "usage_hint": "weight 0.8", "encoder_layer": "2"}
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")


def test_weighted_caption_tokens_and_weights_as_kohya(tiny_sd):
    """kohya's SdTokenizeStrategy.tokenize_with_weights + encode_tokens_with_weights: the weights'
    brackets leave the text, each token's state is scaled by its weight, nothing else changes."""
    import torch

    from library.models.text import apply_token_weights, encode_text, tokenize, tokenize_weighted

    m = tiny_sd
    for length in (None, 150):
        ids, weights = tokenize_weighted(m.tokenizer, ["a (red:1.5) cube", "plain words"], length)
        assert torch.equal(ids, tokenize(m.tokenizer, ["a red cube", "plain words"], length))
        plain = encode_text(m.tokenizer, m.text_encoder, ["a red cube", "plain words"], length)
        weighted = encode_text(m.tokenizer, m.text_encoder, ["a (red:1.5) cube", "plain words"], length, weighted=True)
        assert torch.equal(weighted[1], plain[1])
        assert torch.allclose(weighted[0, 2], plain[0, 2] * 1.5) and torch.equal(weighted[0, 1], plain[0, 1])
        assert torch.equal(apply_token_weights(plain, torch.ones_like(weights)), plain)


def test_schedule_free_optimizers_sample_and_save_averaged_weights(tiny_model, tmp_path, capsys):
    """kohya's get_optimizer (AdamWScheduleFree/RAdamScheduleFree/SGDScheduleFree from schedulefree),
    get_optimizer_train_eval_fn (eval around sampling and saving) and get_dummy_scheduler."""
    pytest.importorskip("schedulefree")
    import torch

    from library.training.loop import in_eval_mode, is_schedule_free
    from library.training.optim import build_optimizer

    layer = torch.nn.Linear(4, 4)
    for name in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"):
        args = A.parse_args(_parser(), ["--optimizer_type", name, "--learning_rate", "0.1"])
        optimizer, desc = build_optimizer(args, [{"params": list(layer.parameters())}], "cpu")
        # kohya's ss_optimizer: the class's module and name
        assert is_schedule_free(optimizer) and desc.startswith("schedulefree.") and desc.endswith(f".{name}")
    for _ in range(3):
        layer(torch.randn(2, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = layer.weight.detach().clone()
    seen = in_eval_mode(optimizer, lambda: layer.weight.detach().clone())()
    assert not torch.equal(seen, training)  # the averaged weights, not the training point
    assert torch.equal(layer.weight, training)  # back in train mode afterwards
    # a run with one: the lr schedule is the optimizer's own (kohya's dummy scheduler), said once
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    run_train_network(_train_args(tiny_model.single_file, data, tmp_path / "out", "--max_train_steps=3",
                                  "--optimizer_type=AdamWScheduleFree", "--lr_scheduler=cosine"))
    assert (tmp_path / "out" / "last.safetensors").is_file()
    assert capsys.readouterr().err.count("keeps its own schedule") == 1


def test_huber_defaults_and_threshold_match_kohya():
    """kohya's add_training_arguments defaults (loss_type l2, huber_schedule snr, huber_c 0.1,
    huber_scale 1.0) and get_huber_threshold_if_needed, transcribed here for each schedule."""
    import math

    import torch

    from library.models.loading import make_noise_scheduler
    from library.training import losses

    args = A.parse_args(_parser(), [])
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale) == ("l2", "snr", 0.1, 1.0)
    sched = make_noise_scheduler()
    t = torch.tensor([0, 250, 999])
    c, scale = 0.3, 2.0
    alpha = -math.log(c) / sched.config.num_train_timesteps
    abar = torch.index_select(sched.alphas_cumprod, 0, t)
    sigmas = ((1.0 - abar) / abar) ** 0.5
    kohya = {"exponential": torch.exp(-alpha * t) * scale, "snr": (1 - c) / (1 + sigmas) ** 2 + c,
             "constant": torch.full((3,), c * scale)}
    for schedule, want in kohya.items():
        got = losses.huber_threshold(schedule, c, scale, t, sched.alphas_cumprod, sched.config.num_train_timesteps)
        torch.testing.assert_close(got.float(), want.float())


def test_initial_step_position_follows_kohya():
    """kohya's train_network.py: initial_step wins over initial_epoch ((epoch - 1) x updates per epoch);
    the epoch to start is step // updates per epoch; without --skip_until_initial_step steps count from 0."""
    from library.training.loop import start_position

    assert start_position(None, None, False, 10, 1) is None
    assert start_position(3, None, False, 10, 2) == (0, 2, 0)       # 5 updates/epoch: epoch index 2
    assert start_position(3, 7, True, 10, 2) == (7, 1, 4)           # step 7: epoch 1, its 2nd update = batch 4
    assert start_position(None, 12, True, 10, 1) == (12, 1, 2)


def test_initial_epoch_run_numbers_its_saves_from_there(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=2)
    out = tmp_path / "out"
    run_train_network(_train_args(tiny_model.single_file, data, out, "--max_train_epochs=4", "--save_every_n_epochs=1",
                                  "--initial_epoch=3"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last-000003.safetensors", "last.safetensors"]


def test_console_log_file_and_level(tmp_path):
    """kohya's setup_logging: --console_log_file writes log records to the file at --console_log_level."""
    import logging

    log = tmp_path / "run.log"
    A.parse_args(_parser(), ["--console_log_level", "debug", "--console_log_file", str(log)])
    try:
        logging.getLogger("networks.lora").debug("a debug line")
        logging.getLogger("networks.lora").info("an info line")
        text = log.read_text(encoding="utf-8")
        assert "a debug line" in text and "an info line" in text
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_console_log", False)]:
            root.removeHandler(h)
            h.close()
        root.setLevel(logging.WARNING)


def test_debug_dataset_shows_the_batches_and_trains_nothing(tiny_model, tmp_path, capsys):
    """kohya's train_util.debug_dataset (called by train_network.py for --debug_dataset, then return)."""
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2, caption="a sks disk")
    out = tmp_path / "out"
    result = run_train_network(_train_args(tiny_model.single_file, data, out, "--debug_dataset",
                                           "--caption_prefix=photo,"))
    assert result == {"debug_dataset": 4}  # 2 images x 2 repeats
    text = capsys.readouterr().out
    assert text.count("caption: 'photo, a sks disk'") == 4 and "64x64" in text
    assert len(list((out / "debug_dataset").glob("*.png"))) == 4
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("method", ["lanczos", "nearest", "bilinear", "bicubic", "area", "box"])
def test_resize_interpolation_methods(method):
    """kohya's resize_image: lanczos and box through PIL, the others through OpenCV (get_cv2_interpolation)."""
    import cv2
    import numpy as np
    from PIL import Image

    from library.data.transforms import resize_to

    arr = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    got = resize_to(arr, (80, 60), method)
    if method in ("lanczos", "box"):
        want = np.asarray(Image.fromarray(arr).resize((80, 60), getattr(Image.Resampling, method.upper())))
    else:
        flag = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                "area": cv2.INTER_AREA}[method]
        want = cv2.resize(arr, (80, 60), interpolation=flag)
    assert np.array_equal(got, want)


def test_resize_interpolation_reaches_the_dataset(tmp_path):
    """--resize_interpolation (and the dataset config's resize_interpolation key) is used for the images."""
    from library.data import build_dataset_group, dataset_configs_from_args

    write_image_folder(tmp_path / "d", "1_x", count=1, size=100)
    pixels = {}
    for method in ("nearest", "area"):
        args = A.parse_args(_parser(), [f"--train_data_dir={tmp_path / 'd'}", "--resolution=64",
                                        "--caption_extension=.txt", f"--resize_interpolation={method}"])
        group = build_dataset_group(dataset_configs_from_args(args), seed=0)
        assert group.datasets[0].subsets[0].resize_interpolation == method
        pixels[method] = group.epoch_dataset(0)[0]["images"]
    assert not pixels["nearest"].equal(pixels["area"])


def test_missing_kohya_flags_are_documented():
    """kohya train_network.py's setup_parser flags (library/kohya_flags.py) that our parser lacks are
    exactly the ones docs/kohya_compat.md names, each with why."""
    import re
    from pathlib import Path

    from library.kohya_flags import TRAIN_NETWORK_FLAGS

    ours = {o.lstrip("-") for a in _parser()._actions for o in a.option_strings}
    missing = TRAIN_NETWORK_FLAGS - ours
    doc = (Path(__file__).resolve().parents[1] / "docs" / "kohya_compat.md").read_text(encoding="utf-8")
    section = doc.split("## kohya train_network.py flags we lack", 1)[1]
    listed = set(re.findall(r"`([a-z0-9_]+)`", section)) & TRAIN_NETWORK_FLAGS
    assert listed == missing, (sorted(missing - listed), sorted(listed - missing))
    assert f"{len(missing)} of {len(TRAIN_NETWORK_FLAGS)}" in doc


def test_enable_wildcard_picks_a_line_and_choices_as_kohya(tmp_path):
    """kohya's read_caption (all non-empty lines with enable_wildcard, else the first) and process_caption
    (a random line, then {a|b} -> one choice, {{ }} literal)."""
    from library.data import build_dataset_group, dataset_configs_from_args

    folder = write_image_folder(tmp_path / "d", "1_x", count=1)
    (folder / "img_000.txt").write_text("a {red|blue} disk {{x}}\n\nsecond line\n", encoding="utf-8")

    def captions(*flags):
        args = A.parse_args(_parser(), [f"--train_data_dir={tmp_path / 'd'}", "--resolution=64",
                                        "--caption_extension=.txt", *flags])
        group = build_dataset_group(dataset_configs_from_args(args), seed=0)
        return {group.epoch_dataset(e)[0]["captions"][0] for e in range(40)}

    assert captions() == {"a {red|blue} disk {{x}}"}
    assert captions("--enable_wildcard") == {"a red disk {x}", "a blue disk {x}", "second line"}


def test_save_n_epoch_ratio_sets_the_epoch_interval(tiny_model, tmp_path):
    """kohya's train_network.py: save_every_n_epochs = math.floor(num_train_epochs / save_n_epoch_ratio) or 1."""
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=1)
    out = tmp_path / "out"
    run_train_network(_train_args(tiny_model.single_file, data, out, "--max_train_epochs=5", "--save_n_epoch_ratio=2"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == \
        ["last-000002.safetensors", "last-000004.safetensors", "last.safetensors"]

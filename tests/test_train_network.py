"""End-to-end tests of train_network.py on the tiny SD1.5-structured model."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import run_train_network, write_image_folder

REPO = Path(__file__).resolve().parents[1]


def base_args(model, data, out, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=64", "--network_module=networks.lora", "--network_dim=4", "--train_batch_size=1",
            "--learning_rate=1e-3", "--seed=7", "--caption_extension=.txt", *extra]


def test_the_usual_kohya_command_runs_unchanged(tiny_model, tmp_path):
    """The kohya command users run (README), with only the model path (and sizes for CPU) swapped."""
    data = tmp_path / "lora_train_set"
    write_image_folder(data, "10_test", count=2, size=64)
    # The user's captions are .txt files and the command does not pass --caption_extension.
    cmd = [sys.executable, str(REPO / "train_network.py"),
           f"--pretrained_model_name_or_path={tiny_model.single_file}", "--train_data_dir=lora_train_set",
           "--output_dir=lora_output", "--logging_dir=training_logs/logs", "--resolution=64,64",
           "--network_module=networks.lora", "--network_dim=32", "--train_batch_size=1", "--max_train_steps=6",
           "--mixed_precision=fp16", "--cache_latents", "--learning_rate=5e-5", "--save_every_n_epochs=50",
           "--save_model_as=safetensors", "--save_state", "--log_with=tensorboard", "--gradient_accumulation_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32" in proc.stderr and proc.stderr.count("needs a CUDA GPU") == 1  # warned once, trained anyway
    assert ".txt" in proc.stdout + proc.stderr  # told once that .txt captions are used
    lora = tmp_path / "lora_output" / "last.safetensors"
    assert lora.is_file()
    state = tmp_path / "lora_output" / "last-state"
    assert (state / "train_state.json").is_file() and (state / "optimizer.pt").is_file()
    events = list((tmp_path / "training_logs" / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["ss_network_dim"] == "32" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "6" and meta["ss_mixed_precision"] == "no"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model_") for k in keys)


def test_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "3_sks disk", count=3)
    common = ["--max_train_steps=8", "--gradient_accumulation_steps=2", "--lr_scheduler=cosine",
              "--lr_warmup_steps=2"]
    full = tmp_path / "full"
    run_train_network(base_args(tiny_model.single_file, data, full, *common, "--save_every_n_steps=3",
                                "--save_state"))
    stop_state = full / "last-step00000003-state"
    assert stop_state.is_dir()
    resumed = tmp_path / "resumed"
    run_train_network(base_args(tiny_model.single_file, data, resumed, *common, f"--resume={stop_state}"))
    a = load_file(str(full / "last.safetensors"))
    b = load_file(str(resumed / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # and the run really moved away from the start
    start = load_file(str(full / "last-step00000003.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a if k.endswith("lora_up.weight"))


def test_learning_lowers_denoising_loss(tiny_model, tmp_path):
    """Held-out (noise, timestep) pairs on the training images: loss with the LoRA < without."""
    from library.models.loading import load_sd_model
    from library.models.text import encode_captions
    import networks.lora as lora

    data = tmp_path / "data"
    write_image_folder(data, "4_sks disk", count=4, caption="a sks disk")
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=60", "--train_batch_size=4",
                                "--network_dim=8", "--network_alpha=8", "--learning_rate=3e-3", "--cache_latents",
                                "--network_train_unet_only"))
    model = load_sd_model(str(tiny_model.single_file))
    from PIL import Image
    import numpy as np

    images = sorted((data / "4_sks disk").glob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in images])
    x = x.float() / 127.5 - 1
    with torch.no_grad():
        latents = model.vae.encode(x).latent_dist.mode() * model.vae.config.scaling_factor
        hidden = encode_captions(model.tokenizer, model.text_encoder, ["a sks disk"] * len(images))
    g = torch.Generator().manual_seed(123)
    pairs = [(torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (len(images),), generator=g))
             for _ in range(16)]

    def held_out_loss():
        total = 0.0
        with torch.no_grad():
            for noise, t in pairs:
                noisy = model.noise_scheduler.add_noise(latents, noise, t)
                total += torch.nn.functional.mse_loss(model.unet(noisy, t, hidden).sample, noise).item()
        return total / len(pairs)

    without = held_out_loss()
    network, _ = lora.create_network_from_weights(1.0, str(out / "last.safetensors"), model.vae,
                                                  model.text_encoder, model.unet)
    network.apply_to(model.text_encoder, model.unet)
    network.load_weights(str(out / "last.safetensors"))
    with_lora = held_out_loss()
    assert with_lora < 0.9 * without, (with_lora, without)


def test_metadata_and_hash(tiny_model, tmp_path):
    from networks.lora_format import data_section_sha256

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    write_image_folder(data, "1_other thing", count=1, seed=3)
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=2", "--output_name=my lora",
                                "--training_comment=hello", "--save_precision=fp16"))
    path = out / "my lora.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert dtypes == {torch.float16}
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_network_args"):
        if meta.get(key) not in (None, "None"):
            json.loads(meta[key])
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs["2_sks disk"] == {"n_repeats": 2, "img_count": 2}
    assert meta["ss_output_name"] == "my lora" and meta["ss_training_comment"] == "hello"
    assert meta["ss_num_train_images"] == "5"  # 2 images x 2 repeats + 1 x 1
    assert meta["ss_sd_model_name"] == Path(tiny_model.single_file).name
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(Path(tiny_model.single_file).read_bytes()).hexdigest()
    assert meta["sshs_model_hash"] == data_section_sha256(path)
    assert "lora_adapter_metadata" not in meta


def test_config_file_round_trip(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    out = tmp_path / "out"
    cfg = tmp_path / "settings.toml"
    import train_network
    from library import args as A

    parser = train_network.setup_parser()
    with pytest.raises(SystemExit):
        A.parse_args(parser, base_args(tiny_model.single_file, data, out, "--max_train_steps=2", "--network_dim=8",
                                       f"--config_file={cfg}", "--output_config"))
    text = cfg.read_text()
    assert "network_dim = 8" in text and "max_train_steps = 2" in text
    keys = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}
    assert not keys & {"output_config", "config_file", "debug"}
    args = A.parse_args(train_network.setup_parser(), [f"--config_file={cfg}", "--learning_rate=0.5"])
    assert args.network_dim == 8 and args.max_train_steps == 2 and args.learning_rate == 0.5
    assert args.resolution == (64, 64)



def test_epoch_saves_keep_last_n_and_ckpt_format(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=2)
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_epochs=5", "--save_every_n_epochs=1",
                                "--save_last_n_epochs=2", "--save_model_as=ckpt", "--save_state"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["last-000003-state", "last-000003.ckpt", "last-000004-state", "last-000004.ckpt",
                     "last-state", "last.ckpt"], names
    weights = torch.load(out / "last.ckpt", weights_only=True)  # tensors only: loads without unpickling code
    assert any(k.endswith("lora_down.weight") for k in weights)


def test_accelerate_launch_runs_the_script(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=1)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--num_processes=1", "--num_machines=1", "--mixed_precision=no",
           "--dynamo_backend=no", str(REPO / "train_network.py"),
           *base_args(tiny_model.single_file, data, tmp_path / "out", "--max_train_steps=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_torch_compile_trains_the_same_weights(tiny_model, tmp_path):
    """--torch_compile traces the U-Net with the LoRA hooks in it (backend 'eager': no C++ build in CI)."""
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    common = ["--max_train_steps=3", "--cache_latents", "--network_train_unet_only"]
    run_train_network(base_args(tiny_model.single_file, data, tmp_path / "plain", *common))
    run_train_network(base_args(tiny_model.single_file, data, tmp_path / "compiled", *common, "--torch_compile",
                                "--dynamo_backend=eager"))
    a = load_file(str(tmp_path / "plain" / "last.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "last.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_samples_during_training_with_clip_skip(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks disk --n blurry --w 64 --h 64 --s 2 --l 3 --d 5\n# a comment line\n")
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=2", "--clip_skip=2",
                                f"--sample_prompts={prompts}", "--sample_at_first", "--sample_every_n_steps=2"))
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 2 and all("_5.png" in p.name for p in samples)  # before training and at step 2


def test_frozen_text_encoder_outputs_are_cached_automatically(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2)
    run_train_network(base_args(tiny_model.single_file, data, tmp_path / "auto", "--max_train_steps=2",
                                "--network_train_unet_only"))
    assert "its outputs are cached" in capsys.readouterr().out
    run_train_network(base_args(tiny_model.single_file, data, tmp_path / "shuffled", "--max_train_steps=2",
                                "--network_train_unet_only", "--shuffle_caption"))
    assert "its outputs are cached" not in capsys.readouterr().out  # shuffled captions change every step


def test_last_epoch_end_is_handled_when_the_last_step_ends_it(tiny_model, tmp_path):
    """2 images x 1 repeat, 2 epochs = 4 steps: the 4th step ends epoch 2, which still gets its samples."""
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks disk --w 64 --h 64 --s 1 --d 1\n")
    out = tmp_path / "out"
    result = run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_epochs=2",
                                         f"--sample_prompts={prompts}", "--sample_every_n_epochs=1"))
    assert result["state"].epoch == 2 and result["state"].global_step == 4
    assert len(list((out / "sample").glob("*e000002*.png"))) == 1


def test_model_hash_prefetched_in_the_background_equals_the_file_hash(tmp_path):
    from library.training import metadata

    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 8192)  # 2 MiB, past the legacy hash's 1 MiB offset
    metadata.prefetch_model_hashes(str(path), None, str(tmp_path))  # folders and None are skipped
    assert str(path) in metadata._hashing and str(tmp_path) not in metadata._hashing
    got = metadata.model_hashes(str(path), "sd_model")
    assert got["ss_new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) not in metadata._hashing  # used once, then the lru cache answers


def test_fp8_base_stores_the_unet_in_fp8_and_trains_the_lora(tiny_model, tmp_path, monkeypatch):
    """--fp8_base: the frozen U-Net's layers hold float8 weights while the LoRA trains through them."""
    import library.lora.trainer as trainer

    seen = {}
    store = trainer.store_in_fp8

    def recording_store(unet, dtype):
        store(unet, dtype)
        seen["dtypes"] = {type(m).__name__: {str(p.dtype) for p in m.parameters(recurse=False)}
                          for m in unet.modules() if type(m).__name__ in ("Linear", "Conv2d", "GroupNorm")}
        seen["compute"] = dtype

    monkeypatch.setattr(trainer, "store_in_fp8", recording_store)
    data = tmp_path / "data"
    write_image_folder(data, "1_sks", count=2)
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--fp8_base", "--mixed_precision=bf16",
                                "--max_train_steps=3", "--network_train_unet_only", "--output_name=fp8"))
    assert seen["compute"] == torch.bfloat16
    assert seen["dtypes"]["Linear"] == seen["dtypes"]["Conv2d"] == {"torch.float8_e4m3fn"}
    assert "torch.float8_e4m3fn" not in seen["dtypes"]["GroupNorm"]  # norms keep their precision
    lora = load_file(str(out / "fp8.safetensors"))
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().max() > 0 for v in ups)  # lora_up starts at zero: it moved, so gradients flowed


def test_fp8_base_without_mixed_precision_is_refused_before_loading(tiny_model, tmp_path):
    from library.errors import UserError

    data = tmp_path / "data"
    write_image_folder(data, "1_sks", count=1)
    with pytest.raises(UserError, match="--fp8_base") as err:
        run_train_network(base_args(tmp_path / "missing.safetensors", data, tmp_path / "out", "--fp8_base"))
    assert "mixed_precision=bf16" in err.value.fix

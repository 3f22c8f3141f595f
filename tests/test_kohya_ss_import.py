"""kohya_ss GUI presets (the JSON its LoRA tab saves) imported and run.

The translation follows kohya_gui/lora_gui.py's train_model: LoRA_type -> network_module and
network_args, max_resolution -> resolution, optimizer -> optimizer_type, lr_warmup (percent) ->
lr_warmup_steps as a fraction, noise keys by noise_offset_type, text-encoder/UNet learning rates ->
network_train_unet_only (resolve_network_train_flags), quoted argument strings split on whitespace,
zeros and empty strings that mean "off" left out; "epoch" is not an sd-scripts flag and goes nowhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.gui_fixtures import app, gui_display, gui_home, make_app  # noqa: F401
from tests.helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]


def kohya_ss_preset(tmp_path, tiny_model, **changes) -> Path:
    """A preset with the keys and value types kohya_ss writes (strings for some numbers, "" for unset)."""
    data = write_image_folder(tmp_path / "data", count=2, size=64).parent
    preset = {
        "LoRA_type": "Kohya LoCon", "LyCORIS_preset": "full", "adaptive_noise_scale": 0,
        "additional_parameters": '--max_grad_norm 0.5 --not_a_flag 3', "block_alphas": "", "block_dims": "",
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": False,
        "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0, "caption_extension": ".txt",
        "clip_skip": "1", "color_aug": False, "conv_alpha": 1, "conv_dim": 2, "enable_bucket": True, "epoch": 1,
        "factor": -1, "flip_aug": False, "full_fp16": False, "gpu_ids": "", "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False, "keep_tokens": "0", "learning_rate": 0.0001, "logging_dir": "",
        "lora_network_weights": "", "lr_scheduler": "cosine", "lr_scheduler_args": "",
        "lr_scheduler_num_cycles": "", "lr_warmup": 10, "max_bucket_reso": 128, "max_data_loader_n_workers": "0",
        "max_resolution": "64,64", "max_timestep": 1000, "max_token_length": "75", "max_train_epochs": "",
        "max_train_steps": "2", "mem_eff_attn": False, "min_bucket_reso": 64, "min_snr_gamma": 5,
        "mixed_precision": "no", "module_dropout": 0, "multi_gpu": False, "multires_noise_discount": 0.3,
        "multires_noise_iterations": 6, "network_alpha": 2, "network_dim": 4, "network_dropout": 0,
        "noise_offset": 0.05, "noise_offset_type": "Original", "num_cpu_threads_per_process": 2,
        "optimizer": "AdamW", "optimizer_args": '"weight_decay=0.05" "betas=0.9,0.99"',
        "output_dir": str(tmp_path / "out"), "output_name": "imported", "persistent_data_loader_workers": False,
        "pretrained_model_name_or_path": str(tiny_model.single_file), "prior_loss_weight": 1.0, "random_crop": False,
        "rank_dropout": 0, "reg_data_dir": "", "resume": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
        "sample_prompts": "", "sample_sampler": "euler_a", "save_every_n_epochs": 0, "save_model_as": "safetensors",
        "save_precision": "fp16", "save_state": False, "scale_weight_norms": 0, "sdxl": False, "seed": "42",
        "shuffle_caption": False, "stop_text_encoder_training": 0, "text_encoder_lr": 0.0,
        "train_batch_size": 1, "train_data_dir": str(data), "unet_lr": 0.0001, "v2": False,
        "v_parameterization": False, "vae": "", "wandb_api_key": "", "xformers": "sdpa",
    }
    preset.update(changes)
    path = tmp_path / "kohya_ss preset.json"
    path.write_text(json.dumps(preset, indent=4), encoding="utf-8")
    return path


def test_translation_follows_kohya_ss():
    from library.kohya_ss import translate

    gui = {"LoRA_type": "LyCORIS/LoKr", "factor": 8, "conv_dim": 4, "conv_alpha": 2, "decompose_both": False,
           "max_resolution": "768,768", "optimizer": "Prodigy", "optimizer_args": '"d_coef=1.0" "decouple=True"',
           "lr_warmup": 5, "lr_warmup_steps": "", "max_train_steps": "1000", "text_encoder_lr": 5e-5,
           "unet_lr": 0, "noise_offset_type": "Multires", "noise_offset": 0.1, "multires_noise_iterations": 6,
           "multires_noise_discount": 0.3, "clip_skip": "2", "max_train_epochs": "", "save_every_n_steps": 0,
           "epoch": 10, "xformers": "xformers", "sample_prompts": "a cat --w 512 --h 512"}
    out = translate(gui)
    v = out.values
    assert v["network_module"] == "lycoris.kohya"
    assert v["network_args"] == ["algo=lokr", "conv_dim=4", "conv_alpha=2", "factor=8", "decompose_both=False"]
    assert v["resolution"] == "768,768" and v["optimizer_type"] == "Prodigy"
    assert v["optimizer_args"] == ["d_coef=1.0", "decouple=True"]
    assert v["lr_warmup_steps"] == 0.05                      # 5 % of the run, as a fraction
    assert v["network_train_text_encoder_only"] is True and "network_train_unet_only" not in v
    assert v["multires_noise_iterations"] == 6 and "noise_offset" not in v
    assert v["xformers"] is True and v["clip_skip"] == "2"
    assert "epoch" not in v and "max_train_epochs" not in v and "save_every_n_steps" not in v
    assert out.sample_prompts_text == "a cat --w 512 --h 512"
    assert translate({"LoRA_type": "LyCORIS/iA3"}).notes[0].startswith("LoRA_type 'LyCORIS/iA3' is not trained")


def test_imported_kohya_ss_preset_runs(tmp_path, tiny_model):
    source = kohya_ss_preset(tmp_path, tiny_model)
    out = tmp_path / "imported.toml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "kohya_ss_preset.py"), str(source), str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not known here, left out: --not_a_flag 3" in proc.stdout
    table = tomllib.loads(out.read_text(encoding="utf-8"))
    assert table["network_args"] == ["conv_dim=2", "conv_alpha=1"]
    assert table["optimizer_args"] == ["weight_decay=0.05", "betas=0.9,0.99"]
    assert table["resolution"] == "64,64" and table["max_train_steps"] == 2 and table["seed"] == 42
    assert table["network_train_unet_only"] is True and table["lr_warmup_steps"] == 0.1
    assert table["noise_offset"] == 0.05 and "multires_noise_iterations" not in table
    assert table["max_grad_norm"] == 0.5 and table["sdpa"] is True
    run = subprocess.run([sys.executable, str(REPO / "train_network.py"), "--config_file", str(out)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "imported.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and not any(k.startswith("lora_te") for k in keys)         # UNet only, as the rates say
    assert any("conv" in k for k in keys if k.endswith("lora_down.weight"))  # LoCon: 3x3 convs too
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2


def test_sdxl_preset_is_refused_with_the_reason(tmp_path, tiny_model):
    from gui.kohya_import import convert
    from library.errors import UserError

    if (REPO / "sdxl_train_network.py").exists():
        pytest.skip("sdxl_train_network.py exists: SDXL presets import")
    with pytest.raises(UserError, match="sdxl_train_network.py"):
        convert(kohya_ss_preset(tmp_path, tiny_model, sdxl=True), tmp_path / "x.toml")


@pytest.mark.gui
def test_gui_import_loads_the_preset_with_notes(app, tmp_path, tiny_model):
    source = kohya_ss_preset(tmp_path, tiny_model, sample_prompts="a sks disk --w 64 --h 64\n")
    path = app.import_kohya_ss(str(source))
    tab = app.tabs["train_network"]
    assert app.notebook.select() == str(tab) and path.is_file()
    values, _ = tab.values()
    assert values["network_alpha"] == 2 and values["network_args"] == ["conv_dim=2", "conv_alpha=1"]
    prompts = Path(values["sample_prompts"])
    assert prompts.read_text(encoding="utf-8") == "a sks disk --w 64 --h 64\n"
    notes = tab.notes.cget("text")
    assert "Imported from the kohya_ss preset" in notes and "--not_a_flag" in notes
    assert path.stem in [p.path.stem for p in tab.preset_files]

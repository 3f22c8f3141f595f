"""train_controlnet.py end to end on the tiny SD1.5-shaped model (a few steps each): the stages and
their files, frozen weights, joint mode, early stopping, resume, the one-command pipeline and inference."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.controlnet_support import radar_listing

REPO = Path(__file__).resolve().parents[1]


def _reset_accelerate():
    from library.training.accel import reset_accelerate

    reset_accelerate()


def train(argv):
    import train_controlnet

    _reset_accelerate()
    return train_controlnet.main(argv)


@pytest.fixture(scope="module")
def radar_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar")
    return radar_listing(root, [((64, 64), (12 + 5 * i, 50 - 4 * i)) for i in range(8)], val=(6, 7))


def base_flags(tiny_model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--train_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--cache_latents",
            "--seed", "1", "--learning_rate", "1e-3", "--heatmap_sigma", "4", "--loss_weight_factor", "30",
            "--lora_rank", "2", *extra]


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def stage1(tiny_model, radar_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train(base_flags(tiny_model, radar_data, out, "--max_train_steps", "6", "--save_every_n_steps", "2",
                     "--checkpoints_total_limit", "1", "--save_state"))
    return out


def test_stage1_writes_both_formats_and_numbered_checkpoints(stage1, tiny_model):
    from library.controlnet.model import load_controlnet, read_record
    from library.models.loading import load_sd_model

    assert (stage1 / "controlnet" / "config.json").is_file() and (stage1 / "last.safetensors").is_file()
    record = read_record(stage1 / "controlnet")
    assert record["conditioning_type"] == "radar_heatmap" and record["heatmap_sigma"] == 4.0
    assert read_record(stage1 / "last.safetensors") == record
    done = json.loads((stage1 / "training_complete.json").read_text())
    assert done["steps"] == 6 and done["stage"] == "controlnet"
    assert [h["epoch"] for h in done["history"]] == [1, 2] and "val/loss_shuffled_condition" in done["history"][0]
    # keep-last-N: of the checkpoints at steps 2 and 4 only the last stays (with its state folder)
    numbered = sorted(p.name for p in stage1.iterdir() if p.name.startswith("last-step"))
    assert numbered == ["last-step00000004", "last-step00000004-state"], numbered
    assert (stage1 / "best" / "controlnet" / "config.json").is_file()
    model = load_sd_model(tiny_model.diffusers_dir)
    folder, single = load_controlnet(stage1, model.unet, model.vae), load_controlnet(
        stage1 / "last.safetensors", model.unet, model.vae)
    assert all(torch.equal(folder.state_dict()[k], v) for k, v in single.state_dict().items())
    assert folder.controlnet_down_blocks[0].weight.abs().sum() > 0  # trained: the zero convs moved


def test_resume_latest_continues_from_the_newest_state(stage1, tiny_model, radar_data, tmp_path, capsys):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(stage1, out)
    (out / "training_complete.json").unlink()
    shutil.rmtree(out / "last-state")
    train(base_flags(tiny_model, radar_data, out, "--max_train_steps", "6", "--resume", "latest"))
    said = capsys.readouterr().out
    assert "resuming from the newest state" in said and "last-step00000004-state" in said
    assert json.loads((out / "training_complete.json").read_text())["steps"] == 6


@pytest.fixture(scope="module")
def stage2(stage1, tiny_model, radar_data, tmp_path_factory):
    before = digest(stage1 / "controlnet"), digest(stage1 / "last.safetensors")
    out = tmp_path_factory.mktemp("stage2")
    train(base_flags(tiny_model, radar_data, out, "--max_train_steps", "3", "--train_unet_lora",
                     "--controlnet_path", str(stage1 / "controlnet"), "--output_name", "radar_lora"))
    return out, before


def test_lora_on_a_frozen_controlnet_leaves_it_bit_identical(stage1, stage2):
    from safetensors import safe_open

    out, before = stage2
    assert (digest(stage1 / "controlnet"), digest(stage1 / "last.safetensors")) == before
    done = json.loads((out / "training_complete.json").read_text())
    assert done["controlnet_unchanged"] is True and done["stage"] == "unet_lora"
    assert not (out / "controlnet").exists()
    with safe_open(str(out / "radar_lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "lora" / "training_config.json").read_text())["heatmap_sigma"] == 4.0


def test_joint_mode_moves_the_controlnet_a_little_in_stage_2(tiny_model, radar_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "joint"
    train(base_flags(tiny_model, radar_data, out, "--joint", "--max_train_steps", "4",
                     "--stage2_max_train_steps", "4", "--lora_learning_rate", "1e-3"))
    for part in ("controlnet/config.json", "lora/pytorch_lora_weights.safetensors", "last_controlnet.safetensors",
                 "last_lora.safetensors"):
        assert (out / "final" / part).is_file(), part
    w1 = load_file(str(out / "stage1" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(out / "final" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    zero_convs = [k for k in w1 if k.startswith("controlnet_down_blocks.")]
    stage1_move = torch.cat([w1[k].flatten() for k in zero_convs]).norm()  # from exactly 0 at the start
    stage2_move = torch.cat([(w2[k] - w1[k]).flatten() for k in zero_convs]).norm()
    assert 0 < stage2_move < 0.5 * stage1_move  # stage 2's lr is 0.1 x stage 1's
    assert max((w2[k] - w1[k]).abs().max() for k in w1) > 0
    stage2 = json.loads((out / "stage2" / "training_complete.json").read_text())
    assert stage2["stage"] == "joint" and stage2["record"]["lora_rank"] == 2


def test_early_stopping_after_exactly_patience_flat_epochs(tiny_model, radar_data, tmp_path, capsys):
    out = tmp_path / "early"
    # lr 1e-30 leaves every weight bit-identical, so the fixed-noise validation loss is exactly flat
    train(base_flags(tiny_model, radar_data, out, "--learning_rate", "1e-30", "--max_train_epochs", "10",
                     "--early_stopping_patience", "2"))
    done = json.loads((out / "training_complete.json").read_text())
    history = done["history"]
    assert done["epochs"] == 3 and len(history) == 3  # the baseline epoch + 2 without improvement
    assert len({h["val/loss"] for h in history}) == 1
    assert [h["improved"] for h in history] == [True, False, False]
    assert "early stopping" in capsys.readouterr().out
    # without a validation split the epoch mean of the weighted training loss is monitored
    listing = (radar_data / "metadata.jsonl").read_text().replace('"val"', '"train"')
    data2 = tmp_path / "data2"
    data2.mkdir()
    (data2 / "metadata.jsonl").write_text(listing.replace('"images/', '"' + str(radar_data / "images") + "/"))
    out2 = tmp_path / "early2"
    train(base_flags(tiny_model, data2, out2, "--max_train_epochs", "10", "--early_stopping_patience", "1",
                     "--early_stopping_min_delta", "1e9"))
    history = json.loads((out2 / "training_complete.json").read_text())["history"]
    assert len(history) == 2 and "loss/epoch_weighted" in history[0] and "val/loss" not in history[0]


def _configs(tmp_path, tiny_model, data):
    (tmp_path / "config.yaml").write_text(
        f"project:\n  name: cn\n  output_dir: {tmp_path / 'out' / 'controlnet'}\n"
        f"model:\n  path: {tiny_model.diffusers_dir}\n"
        f"data:\n  data_dir: {data}\n  resolution: 64\n  range_max: 200\n  vel_max: 40\n"
        "training:\n  train_batch_size: 2\n  max_train_steps: 3\n  learning_rate: 1.0e-3\n  heatmap_sigma: 4.0\n"
        "  loss_weight_factor: 30.0\n  seed: 1\n  cache_latents: true\n")
    (tmp_path / "config_lora.yaml").write_text(
        f"project:\n  name: lora\n  output_dir: {tmp_path / 'out' / 'controlnet_lora'}\n"
        f"data:\n  data_dir: {data}\n  resolution: 64\n"
        "training:\n  train_batch_size: 2\n  max_train_steps: 12\n  learning_rate: 1.0e-4\n  save_steps: 4\n"
        "  checkpoints_total_limit: 1\n"
        "  lora_rank: 2\n  heatmap_sigma: 4.0\n  seed: 1\n  cache_latents: true\n"
        "controlnet:\n  path: \"\"\n")
    return tmp_path / "config.yaml", tmp_path / "config_lora.yaml"


def test_pipeline_resumes_after_being_killed_between_stages(tiny_model, radar_data, tmp_path, capsys):
    from library.controlnet.pipeline import run_pipeline

    cn_config, lora_config = _configs(tmp_path, tiny_model, radar_data)
    cmd = [sys.executable, str(REPO / "train_full_pipeline.py"), "--controlnet_config", str(cn_config),
           "--lora_config", str(lora_config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out1, out2 = tmp_path / "out" / "controlnet", tmp_path / "out" / "controlnet_lora"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not list(out2.glob("lora-step*-state")):  # stage 2 has saved its first state (step 4 of 12)
            assert proc.poll() is None, "the pipeline ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no chance to save anything more
        proc.wait()
    assert (out1 / "training_complete.json").is_file() and not (out2 / "training_complete.json").exists()
    stage1_digest = digest(out1 / "controlnet")
    autofilled = tmp_path / "config_lora_autofilled.yaml"
    assert str(out1 / "controlnet") in autofilled.read_text()
    capsys.readouterr()
    _reset_accelerate()
    run_pipeline(cn_config, lora_config)  # the same command again, in this process
    said = capsys.readouterr().out
    assert "stage 1 already finished" in said and "resuming from the newest state" in said
    assert digest(out1 / "controlnet") == stage1_digest
    done = json.loads((out2 / "training_complete.json").read_text())
    assert done["steps"] == 12 and done["controlnet_unchanged"] is True
    run_pipeline(cn_config, lora_config)
    assert "nothing left to do" in capsys.readouterr().out


def test_inference_writes_images_conditions_and_overlays(stage1, stage2, tmp_path, capsys):
    import inference_controlnet
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("target 0 --targets 100,0 --d 7\ntarget 1 --targets 50,20 150,-20,0.5\n")
    out = tmp_path / "results"
    assert inference_controlnet.main(["--controlnet_path", str(stage1 / "controlnet"), "--prompt_file",
                                      str(prompts), "--output_dir", str(out), "--lora_dir", "", "--steps", "2",
                                      "--heatmap_sigma", "6"]) == 0
    assert "heatmap_sigma = 6 differs from the 4" in capsys.readouterr().err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in results] == [7, 1] and len(results[1]["points"]) == 2
    for r in results:
        for key in ("image", "condition", "overlay"):
            assert Image.open(r[key]).size == (64, 64)
    cond = torch.tensor(list(Image.open(results[0]["condition"]).getdata())).view(64, 64, 3)[..., 0]
    y, x = divmod(int(cond.argmax()), 64)
    assert abs(x - 31.5) <= 1 and abs(y - 31.5) <= 1  # range 100 of 200, velocity 0: the centre
    plain = Image.open(results[0]["image"])
    # with the stage-2 LoRA (its PEFT copy, loaded by diffusers) at scale 1 and 0
    for scale, same in (("1", False), ("0", True)):
        out2 = tmp_path / f"lora{scale}"
        inference_controlnet.main(["--controlnet_path", str(stage1 / "controlnet"), "--prompt_file", str(prompts),
                                   "--output_dir", str(out2), "--lora_dir", str(stage2[0] / "lora"),
                                   "--lora_scale", scale, "--steps", "2", "--heatmap_sigma", "6"])
        with_lora = Image.open(next(out2.glob("000_7.png")))
        assert (list(with_lora.getdata()) == list(plain.getdata())) == same


def test_trainer_automation_flags_save_top_k_and_fast_dev_run(tiny_model, radar_data, tmp_path):
    """The shared Lightning-style flags work in train_controlnet.py too."""
    out = tmp_path / "top"
    train(base_flags(tiny_model, radar_data, out, "--max_train_epochs", "3", "--save_top_k", "2",
                     "--val_split", "0.25", "--accumulate_grad_batches", "1", "--gradient_clip_val", "1.0"))
    index = json.loads((out / "last-top_k.json").read_text())
    kept = sorted(p.name for p in out.glob("last-top-step*.safetensors"))
    assert len(kept) == 2 and sorted(Path(e["file"]).name for e in index["best_first"]) == kept
    values = [e["value"] for e in index["best_first"]]
    assert values == sorted(values) and index["monitor"] == "loss/epoch"

    fast = tmp_path / "fast"
    train(base_flags(tiny_model, radar_data, fast, "--max_train_steps", "10", "--fast_dev_run"))
    assert not fast.exists()

    from library.errors import UserError

    with pytest.raises(UserError, match="save_top_k"):
        train(base_flags(tiny_model, radar_data, tmp_path / "joint", "--joint", "--save_top_k", "1"))


def test_profile_writes_a_trace_and_prints_a_summary(tiny_model, radar_data, tmp_path, capsys):
    out = tmp_path / "prof"
    train(base_flags(tiny_model, radar_data, out, "--max_train_steps", "8", "--profile"))
    assert "profile of steps 3-7" in capsys.readouterr().out
    trace = json.loads((out / "profile_trace.json").read_text())
    assert any("aten::" in event.get("name", "") for event in trace["traceEvents"])


def test_log_images_every_n_steps_grids_in_tensorboard_and_sample_folder(tiny_model, radar_data, tmp_path,
                                                                         monkeypatch):
    """Radar: every 2 steps one grid of the 2 validation images, rows condition | target | result, in
    TensorBoard and <output_dir>/sample; under --fast_dev_run nothing is generated."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out = tmp_path / "out"
    train(base_flags(tiny_model, radar_data, out, "--max_train_steps", "4", "--log_images_every_n_steps", "2"))
    pngs = sorted((out / "sample").glob("*.png"))
    assert [p.name for p in pngs] == ["last_images_000002.png", "last_images_000004.png"]
    grid = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    for row, i in enumerate((6, 7)):  # the validation images, centres (12 + 5i, 50 - 4i)
        cells = [grid[row * 64:(row + 1) * 64, c * 64:(c + 1) * 64] for c in range(3)]
        y, x = np.unravel_index(cells[0][..., 0].argmax(), (64, 64))
        assert abs(x - (12 + 5 * i)) <= 1 and abs(y - (50 - 4 * i)) <= 1  # the heatmap's peak at the target
        assert np.array_equal(cells[1], np.asarray(Image.open(radar_data / "images" / f"{i}.png").convert("RGB")))
    acc = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent),
                           size_guidance={IMAGES: 0})
    acc.Reload()
    events = acc.Images("controlnet/images")
    assert [e.step for e in events] == [2, 4] and (events[0].width, events[0].height) == (3 * 64, 2 * 64)

    from library.controlnet import image_log

    calls = []
    monkeypatch.setattr(image_log, "log_images", lambda *a, **k: calls.append(a))
    fast = tmp_path / "fast"
    train(base_flags(tiny_model, radar_data, fast, "--max_train_steps", "4", "--log_images_every_n_steps", "1",
                     "--fast_dev_run", "3"))
    assert calls == [] and not fast.exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_log_images_every_n_steps_below_one_is_a_parse_error(value, capsys):
    import train_controlnet

    with pytest.raises(SystemExit) as exc:
        train_controlnet.main(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--train_data_dir", "d",
                               "--log_images_every_n_steps", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--log_images_every_n_steps" in err and "integer >= 1" in err


@pytest.mark.parametrize("flag", ["--reg_data_dir", "--dataset_config"])
def test_reg_data_dir_and_dataset_config_are_not_options_and_are_refused_with_the_reason(flag, tmp_path):
    import train_controlnet
    from library.errors import UserError

    assert flag not in {o for a in train_controlnet.setup_parser()._actions for o in a.option_strings}
    argv = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir", "d"]
    for given in ([flag, "x"], [f"{flag}=x"]):
        with pytest.raises(UserError, match=f"{flag}.*Fix: "):
            train_controlnet.main(argv + given)
    assert not (tmp_path / "o").exists()

"""Issue 23, hostile cases: never lose a good file, never write a bad one.

One section per case of the issue (the numbers are the issue's), by trainer where a case concerns
several: train_network.py (LoRA), train_controlnet.py, train_dual_unet.py, train_image_controlnet.py.
Every run is a few steps of a tiny model on one thread.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.errors import UserError
from tests.helpers import run_train_network, write_image_folder

REPO = Path(__file__).resolve().parents[1]


def base_args(model, data, out, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=64", "--network_module=networks.lora", "--network_dim=4", "--train_batch_size=1",
            "--learning_rate=1e-3", "--seed=7", "--caption_extension=.txt", *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def all_finite(folder: Path) -> bool:
    for f in folder.rglob("*.safetensors"):
        if not all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point()):
            return False
    return True


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root, "2_sks disk", count=2)
    return root


@pytest.fixture
def good_run(tiny_model, data, tmp_path):
    """An output folder holding a finished run's last.safetensors."""
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=2"))
    return out


# --- 1. divergence: train_network.py -------------------------------------------------------------

def test_1_diverged_lora_run_stops_and_keeps_the_good_files(tiny_model, data, good_run, capsys):
    before = digest(good_run / "last.safetensors")
    with pytest.raises(UserError) as err:
        run_train_network(base_args(tiny_model.single_file, data, good_run, "--max_train_steps=8",
                                    "--learning_rate=1e6", "--save_every_n_steps=1", "--save_state"))
    message = str(err.value)
    assert "training diverged" in message and "were skipped" in message
    # step 1 was still finite: its files are the last good ones, and the message says how to go on
    assert "last-step00000001.safetensors" in message and "--resume" in message
    assert f'"{good_run / "last-step00000001-state"}"' in message
    assert digest(good_run / "last.safetensors") == before  # the good file was not replaced
    assert not list(good_run.glob("last-step0000000[2-9]*"))  # nothing saved after the divergence
    assert all_finite(good_run)
    assert "step 2: the loss is NaN or Inf; this update is skipped" in capsys.readouterr().err


def test_1_patience_one_stops_at_the_first_nan_step(tiny_model, data, good_run):
    with pytest.raises(UserError, match=r"for 1 optimizer steps in a row \(steps 2-2\)"):
        run_train_network(base_args(tiny_model.single_file, data, good_run, "--max_train_steps=8",
                                    "--learning_rate=1e6", "--divergence_patience=1"))
    assert all_finite(good_run)


def test_1_nan_state_and_nan_network_weights_are_refused_at_load(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=1", "--save_state"))
    state = out / "last-state"
    weights = load_file(str(state / "trainable.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(state / "trainable.safetensors"))
    with pytest.raises(UserError, match="NaN or Inf weights .* saved after the training diverged"):
        run_train_network(base_args(tiny_model.single_file, data, tmp_path / "b", "--max_train_steps=2",
                                    f"--resume={state}"))
    lora = load_file(str(out / "last.safetensors"))
    lora = {k: (torch.full_like(v, float("inf")) if k.endswith("lora_up.weight") else v) for k, v in lora.items()}
    bad = tmp_path / "nan_lora.safetensors"
    save_file(lora, str(bad))
    with pytest.raises(UserError, match="holds NaN or Inf weights"):
        run_train_network(base_args(tiny_model.single_file, data, tmp_path / "c", "--max_train_steps=1",
                                    f"--network_weights={bad}"))
    assert not (tmp_path / "c" / "last.safetensors").exists()


def test_1_guard_skips_transient_nan_steps_and_stops_after_patience():
    from library.training.loop import DivergedError, DivergenceGuard

    guard = DivergenceGuard(patience=2)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    assert guard.step_ok(one, one, 1) and guard.healthy
    assert not guard.step_ok(nan, one, 2) and not guard.healthy  # skipped, not yet stopped
    assert guard.step_ok(one, one, 3) and guard.healthy           # a good step ends the streak
    guard.saved("model", "out/last-step00000003.safetensors")
    assert not guard.step_ok(one, torch.tensor(float("inf")), 4)  # an Inf gradient norm counts too
    with pytest.raises(DivergedError, match=r"gradient norm was NaN or Inf for 2 .*steps 4-5.*last-step00000003"):
        guard.step_ok(one, nan, 5)
    # with an fp16 GradScaler an Inf gradient is the scaler's business (it skips and lowers its scale)
    scaled = DivergenceGuard(patience=1, scaler_skips=True)
    assert scaled.step_ok(one, torch.tensor(float("inf")), 1)


def test_1_save_check_refuses_nan_weights_before_writing(tmp_path):
    from library.fileio import save_safetensors_atomic

    target = tmp_path / "m.safetensors"
    save_safetensors_atomic({"w": torch.ones(2)}, target)
    before = digest(target)
    with pytest.raises(UserError, match="not saving m.safetensors: 1 of the 1 weights tensors hold NaN"):
        save_safetensors_atomic({"w": torch.tensor([1.0, float("nan")])}, target)
    assert digest(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_1_a_truncated_write_never_replaces_the_file(tmp_path):
    from library.fileio import atomic_path

    target = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(target))
    before = digest(target)
    with pytest.raises(OSError, match="safetensors data is"):
        with atomic_path(target) as tmp:
            save_file({"w": torch.ones(8)}, str(tmp))
            data = tmp.read_bytes()
            tmp.write_bytes(data[:-8])  # a short write (full disk, crash of the writer)
    assert digest(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- 4. divergence: the other trainers ------------------------------------------------------------

def test_4_controlnet_trainer_diverging_writes_no_nan_weights(tiny_model, tmp_path):
    import train_controlnet
    from tests.controlnet_support import radar_listing

    listing = radar_listing(tmp_path / "radar", [((64, 64), (12 + 5 * i, 50 - 4 * i)) for i in range(4)])
    out = tmp_path / "cn"
    _reset_accelerate()
    with pytest.raises(UserError, match="training diverged: .* skipped"):
        train_controlnet.main(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--train_data_dir",
                               str(listing), "--output_dir", str(out), "--resolution", "64", "--train_batch_size",
                               "2", "--cache_latents", "--seed", "1", "--learning_rate", "1e6", "--lora_rank", "2",
                               "--max_train_steps", "6"])
    assert all_finite(out)
    assert not (out / "controlnet").exists()  # no final ControlNet folder from NaN weights


def test_4_dual_unet_trainer_diverging_writes_no_nan_weights(tiny_model, tmp_path):
    import train_dual_unet
    from library.dual_unet import toy

    pairs = toy.write_pair_dataset(tmp_path / "pairs", count=4, size=64)
    out = tmp_path / "du"
    _reset_accelerate()
    with pytest.raises(UserError, match="training diverged: the loss was NaN or Inf .* skipped") as err:
        train_dual_unet.main(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--data_dir",
                              str(pairs), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
                              "--unet_lora_rank", "4", "--learning_rate", "1e6", "--seed", "1", "--cache_latents",
                              "--max_steps", "6", "--save_every_n_steps", "1", "--validate_every", "0",
                              "--sample_every", "0"])
    print(err.value)
    assert all_finite(out)


def test_4_image_controlnet_trainer_diverging_stops_with_the_shared_guard(tmp_path):
    import train_image_controlnet as T
    from library.image_controlnet import toy

    data = toy.write_dataset(tmp_path / "data", train_identities=2, val_identities=1, views=2, size=16, seed=0)
    ck = tmp_path / "ck"
    with pytest.raises(UserError, match="training diverged: .* skipped"):
        T.main(["--data_dir", str(data), "--backbone", "small", "--image_size", "16", "--feature_dim", "32",
                "--batch_size", "2", "--num_workers", "0", "--epochs", "4", "--lr", "1e6", "--save_dir", str(ck),
                "--log_dir", str(tmp_path / "logs"), "--save_interval", "1", "--divergence_patience", "2",
                "--max_grad_norm", "0"])
    for f in ck.glob("*.pth"):
        model = torch.load(f, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()), f


# --- 2. pruning only touches this run's files -----------------------------------------------------

def test_2_second_run_prunes_only_its_own_checkpoints(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    common = ["--save_every_n_steps=1", "--save_last_n_steps=3"]
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=12", *common))
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=6", *common))
    steps = sorted(int(p.stem[-8:]) for p in out.glob("last-step*.safetensors"))
    assert steps == [3, 4, 5, 9, 10, 11]  # the second run's last three, and the first run's untouched


# --- 3. one run per output folder -----------------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from library.training.output_lock import OutputDirLock
lock = OutputDirLock({out!r}).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_3_a_second_run_in_the_same_output_dir_is_refused_naming_the_holder(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another training run: process {holder.pid} on"):
            run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=1"))
        assert not (out / "last.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the next run takes the folder over and says whose it was
    result = run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=1"))
    assert result["files"] and (out / "last.safetensors").is_file()
    assert not (out / ".training.lock").exists()  # released at the end


def test_3_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    from library.training.output_lock import OutputDirLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".training.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": time.time(),
                                                         "command": "train_network.py"}))
    with OutputDirLock(tmp_path):
        assert f"taking over the lock of {tmp_path} left by process {dead.pid}" in capsys.readouterr().out
        with pytest.raises(UserError, match=f"process {os.getpid()}"):  # and now it is held
            OutputDirLock(tmp_path).acquire()


# --- 5. 16-bit grayscale images --------------------------------------------------------------------

def test_5_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from library.controlnet.conditioning import load_aligned
    from library.data.buckets import BucketPlanner
    from library.data.probe import load_rgb
    from library.image_controlnet.dataset import load_image

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert abs(np.asarray(load_rgb(str(path))).mean() - 127.5) < 1  # PIL's convert("RGB") gives 255
    assert abs(float(load_image(path, 16).mean())) < 0.01  # [-1, 1]: mid-grey is 0
    placement = BucketPlanner((32, 32), False).place((32, 32))
    assert abs(load_aligned(str(path), (32, 32), placement).mean() - 0.5) < 0.01  # ControlNet conditions


# --- 6. ControlNet conditioning images of another size or aspect ratio ----------------------------

def _cond_listing(root: Path, cond_size):
    (root / "images").mkdir(parents=True)
    (root / "cond").mkdir()
    lines = []
    for i in range(2):
        Image.new("RGB", (64, 64), (100, 120, 140)).save(root / "images" / f"{i}.png")
        Image.new("RGB", cond_size, (255, 255, 255)).save(root / "cond" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": "x",
                                 "conditioning_file_name": f"cond/{i}.png"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_6_condition_of_another_aspect_ratio_is_an_error_and_same_ratio_is_resized(tmp_path, capsys):
    import train_controlnet
    from library.controlnet.data import build_datasets

    parser = train_controlnet.setup_parser()
    wide = _cond_listing(tmp_path / "wide", (96, 64))
    args = parser.parse_args(["--train_data_dir", str(wide), "--resolution", "64", "--conditioning_type", "image"])
    with pytest.raises(UserError, match=r"cond/0.png is 96 x 64 but its image 0.png is 64 x 64 \(another aspect"):
        build_datasets(args, seed=0)
    half = _cond_listing(tmp_path / "half", (32, 32))
    args = parser.parse_args(["--train_data_dir", str(half), "--resolution", "64", "--conditioning_type", "image"])
    train, _, _ = build_datasets(args, seed=0)
    assert "2 conditioning image(s) have another size than their image but the same aspect ratio; they are " \
           "resized to their image's size" in capsys.readouterr().err
    cond, _ = train.sample(0, np.random.default_rng(0))
    assert cond.shape[:2] == (64, 64)


# --- 7. output names stay inside --output_dir -----------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/abs_name", "a/b", ".."])
def test_7_output_name_with_folders_is_refused(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "train_network.py"), f"--output_name={name}",
                           f"--output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--output_name" in proc.stderr and "not a plain file name" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_7_output_name_from_a_config_file_is_checked_too(tmp_path):
    import train_network
    from library.args import parse_args

    cfg = tmp_path / "c.toml"
    cfg.write_text('output_name = "../../escape"\n')
    with pytest.raises(UserError, match="output_name"):
        parse_args(train_network.setup_parser(), [f"--config_file={cfg}"])


# --- 8. a full model where a LoRA is expected -----------------------------------------------------

def test_8_check_lora_weights_and_network_weights_refuse_a_unet_file(tiny_model, data, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model.diffusers_dir), subfolder="unet")
    unet_file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "networks" / "check_lora_weights.py")
    proc = subprocess.run([sys.executable, script, str(unet_file)], env=env, capture_output=True, text=True,
                          timeout=120)
    stderr = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "is not a LoRA file: it is a full model" in stderr
    proc = subprocess.run([sys.executable, script, "--verify", str(unet_file)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "not a LoRA file" in proc.stdout
    with pytest.raises(UserError, match="is not a LoRA file: it is a full model"):
        run_train_network(base_args(tiny_model.single_file, data, tmp_path / "out", "--max_train_steps=1",
                                    f"--network_weights={unet_file}"))
    assert not (tmp_path / "out" / "last.safetensors").exists()


# --- 9. TOML written for --output_config and GUI presets reads back equal -------------------------

HOSTILE_TEXT = "C:\\x\\new \x1b[31m red \x7f del \"quoted\" \t tab \\u0041 é✓"


def test_9_output_config_round_trips_backslash_x_esc_and_del(tmp_path):
    import train_network
    from library.args import parse_args

    cfg = tmp_path / "out.toml"
    with pytest.raises(SystemExit) as done:
        parse_args(train_network.setup_parser(), [f"--config_file={cfg}", "--output_config",
                                                  f"--training_comment={HOSTILE_TEXT}", "--network_dim=8"])
    assert done.value.code == 0
    args = parse_args(train_network.setup_parser(), [f"--config_file={cfg}"])
    assert args.training_comment == HOSTILE_TEXT and args.network_dim == 8


def test_9_gui_preset_and_writer_round_trip(tmp_path):
    import tomllib

    from gui import presets
    from library import toml_writer

    table = {"a": HOSTILE_TEXT, "n": 3, "f": 0.5, "b": True, "l": [HOSTILE_TEXT, "x"], "sec": {"k": "\x00\x1f"}}
    text = toml_writer.dumps(table)
    assert tomllib.loads(text) == table
    preset = presets.dump("train_network", {"training_comment": HOSTILE_TEXT, "network_dim": 8})
    assert tomllib.loads(preset)["training_comment"] == HOSTILE_TEXT


# --- 10. a full disk ------------------------------------------------------------------------------

def test_10_disk_full_while_saving_the_lora_keeps_the_old_file_and_says_so(tiny_model, data, good_run,
                                                                            monkeypatch):
    from library import fileio

    before = digest(good_run / "last.safetensors")

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_sync_file", full)
    with pytest.raises(fileio.DiskFullError) as err:
        run_train_network(base_args(tiny_model.single_file, data, good_run, "--max_train_steps=2"))
    message = str(err.value)
    assert "the disk is full: writing last.safetensors" in message and "needs about" in message
    assert "are free" in message and "still the previous, complete version" in message
    assert digest(good_run / "last.safetensors") == before
    assert not [p for p in good_run.iterdir() if p.name.endswith(".tmp")]


def test_10_disk_full_while_saving_the_state_keeps_the_lora(tiny_model, data, tmp_path, monkeypatch):
    from library import fileio
    from library.training import checkpoint

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):  # what torch says when the disk fills up mid-write
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 1000)
    out = tmp_path / "out"
    with pytest.raises(fileio.DiskFullError) as err:
        run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=2", "--save_state"))
    message = str(err.value)
    assert message.startswith("the disk is full: writing last-state")
    assert f"The model file {out / 'last.safetensors'} was saved; only the state folder last-state is missing" \
        in message and message.endswith("--resume it.")
    assert "1000 bytes are free" in message and "needs about" in message
    assert load_file(str(out / "last.safetensors"))  # the trained LoRA is there and loads
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors"]  # no half state, no temp folder


# --- 11. resume from damaged or mismatched states -------------------------------------------------

@pytest.fixture
def saved_state(tiny_model, data, tmp_path):
    out = tmp_path / "first"
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=3", "--save_every_n_steps=1",
                                "--save_state"))
    return out


def test_11_malformed_or_odd_train_state_json(tiny_model, data, saved_state, tmp_path, capsys):
    state = saved_state / "last-step00000002-state"
    info = json.loads((state / "train_state.json").read_text())
    (state / "train_state.json").write_text(json.dumps({**info, "from_a_newer_version": 1}))
    result = run_train_network(base_args(tiny_model.single_file, data, tmp_path / "b", "--max_train_steps=3",
                                         f"--resume={state}"))
    assert result["state"].global_step == 3
    assert "ignoring unknown keys from_a_newer_version" in capsys.readouterr().err
    (state / "train_state.json").write_text('{"version": 1, "global_step": ')
    with pytest.raises(UserError, match="train_state.json is damaged"):
        run_train_network(base_args(tiny_model.single_file, data, tmp_path / "c", f"--resume={state}"))
    (state / "train_state.json").write_text(json.dumps({**info, "global_step": "two"}))
    with pytest.raises(UserError, match="global_step is 'two', not a int"):
        run_train_network(base_args(tiny_model.single_file, data, tmp_path / "d", f"--resume={state}"))


def test_11_resume_with_a_smaller_dataset_goes_on_with_the_next_epoch(tiny_model, saved_state, tmp_path, capsys):
    small = tmp_path / "small"
    write_image_folder(small, "1_sks disk", count=1)  # 1 batch per epoch; the state is at batch 2 of 4
    result = run_train_network(base_args(tiny_model.single_file, small, tmp_path / "b", "--max_train_steps=4",
                                         f"--resume={saved_state / 'last-step00000002-state'}"))
    assert result["state"].global_step == 4
    assert "the dataset now has 1 batches per epoch; continuing with epoch 2" in capsys.readouterr().out


def test_11_resume_latest_skips_a_damaged_state(saved_state, capsys):
    from library.controlnet.outputs import resolve_resume

    (saved_state / "last-step00000001-state" / "train_state.json").write_text("{not json")
    (saved_state / "last-step00000002-state" / "optimizer.pt").write_bytes(b"")  # killed mid-save
    chosen = resolve_resume("latest", saved_state, "last")
    assert chosen == str(saved_state / "last-state")  # the newest usable one (step 3)
    (saved_state / "last-state" / "rng.pt").write_bytes(b"PK\x03\x04 half")  # truncated
    assert resolve_resume("latest", saved_state, "last") is None  # none usable: a fresh start, said so
    assert "skipping 3 damaged state folder(s)" in capsys.readouterr().err


# --- 12. sample sizes ------------------------------------------------------------------------------

def test_12_sample_prompt_too_large_for_memory_is_refused_before_generating(tiny_model, data, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks disk --w 64 --h 64 --s 1\na huge one --w 65536 --h 65536 --s 1\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"prompt 2 of .*\(65536 x 65536\): generating it needs about 6144.0 GB"):
        run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=2",
                                    f"--sample_prompts={prompts}", "--sample_every_n_steps=1"))
    assert not (out / "last.safetensors").exists()  # refused before training, not killed after it


# --- 13. temporary files of killed saves ----------------------------------------------------------

def test_13_orphan_temporaries_of_this_output_name_are_removed_at_start(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".last.safetensors.k2j3.safetensors.tmp").write_bytes(b"half")
    (out / ".last-step00000002-state.abc.tmp").mkdir()
    (out / ".last-step00000002-state.abc.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / ".last-state.old").mkdir()
    (out / ".other.safetensors.x.tmp").write_bytes(b"not ours")
    run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_steps=1"))
    names = sorted(p.name for p in out.iterdir())
    assert names == [".other.safetensors.x.tmp", "last.safetensors"]
    assert "removed 3 unfinished temporary file(s) left by an interrupted save" in capsys.readouterr().out


# --- 1 and 10 in the shared loop itself (what every trainer goes through) --------------------------

def _toy_loop(tmp_path, compute_loss, save_model, **settings):
    from library.logs import ProgressLogger
    from library.training.loop import LoopHooks, LoopSettings, run_training_or_exit
    from tests.test_trainer_automation import ToyGroup, accelerator

    acc = accelerator()
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.01))
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    cfg = LoopSettings(**{"max_train_steps": 6, "num_epochs": 10, "gradient_accumulation_steps": 1,
                          "max_grad_norm": 1.0, "output_dir": tmp_path, "output_name": "m", "seed": 3, **settings})
    hooks = LoopHooks(compute_loss=lambda batch: compute_loss(model, batch), save_model=save_model, trainable=model,
                      params_to_clip=list(model.parameters()))
    state = run_training_or_exit(acc, ToyGroup(3), optimizer, scheduler, hooks, cfg, torch.Generator().manual_seed(3),
                                 ProgressLogger(acc))
    return state, model


def test_1_loop_skips_a_transient_nan_step_and_trains_on(tmp_path, capsys):
    calls = []

    def compute_loss(model, batch):
        calls.append(1)
        loss = (model(batch["x"]) - 0.5 * batch["x"]).pow(2).mean()
        return loss * float("nan") if len(calls) == 3 else loss  # one bad batch

    saved = []
    state, model = _toy_loop(tmp_path, compute_loss, lambda kind, epoch, step: saved.append((kind, step)))
    assert state.global_step == 6 and torch.isfinite(model.weight).all()
    assert saved == [("final", 6)]
    assert "step 3: the loss is NaN or Inf; this update is skipped" in capsys.readouterr().err


def test_10_ctrl_c_on_a_full_disk_saves_the_weights_alone(tmp_path, monkeypatch):
    import signal

    from library import fileio
    from library.training import checkpoint

    monkeypatch.setattr(checkpoint, "save_train_state", lambda path, *a, **k: (_ for _ in ()).throw(
        fileio.DiskFullError(f"the disk is full: writing {Path(path).name} needs about 1.0 GB, and 10 KB are free.")))
    calls, saved = [], []

    def compute_loss(model, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return (model(batch["x"]) - 0.5 * batch["x"]).pow(2).mean()

    def save_model(kind, epoch, step):
        path = tmp_path / f"m-step{step:08d}.safetensors"
        fileio.save_safetensors_atomic({"w": torch.ones(1)}, path)
        saved.append(path)
        return path

    monkeypatch.setattr("library.training.loop.save_train_state", checkpoint.save_train_state)
    with pytest.raises(fileio.DiskFullError, match=r"m-interrupted-state needs about 1.0 GB.* The trained weights "
                                                    r"were saved alone instead: .*m-step00000002.safetensors"):
        _toy_loop(tmp_path, compute_loss, save_model, max_train_steps=10)
    assert saved == [tmp_path / "m-step00000002.safetensors"] and saved[0].is_file()


def test_3_image_controlnet_trainer_refuses_a_save_dir_in_use(tmp_path):
    import train_image_controlnet as T
    from library.image_controlnet import toy
    from library.training.output_lock import OutputDirLock

    data = toy.write_dataset(tmp_path / "data", train_identities=2, val_identities=1, views=2, size=16, seed=0)
    ck = tmp_path / "ck"
    with OutputDirLock(ck):
        with pytest.raises(UserError, match=f"in use by another training run: process {os.getpid()}"):
            T.main(["--data_dir", str(data), "--backbone", "small", "--image_size", "16", "--feature_dim", "32",
                    "--batch_size", "2", "--num_workers", "0", "--epochs", "1", "--save_dir", str(ck),
                    "--log_dir", str(tmp_path / "logs")])
    assert not list(ck.glob("*.pth"))


def test_2_controlnet_second_run_prunes_only_its_own_checkpoint_folders(tiny_model, tmp_path):
    import train_controlnet
    from tests.controlnet_support import radar_listing

    listing = radar_listing(tmp_path / "radar", [((64, 64), (12 + 5 * i, 50 - 4 * i)) for i in range(4)])
    out = tmp_path / "cn"
    for steps in ("6", "3"):
        _reset_accelerate()
        train_controlnet.main(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--train_data_dir",
                               str(listing), "--output_dir", str(out), "--resolution", "64", "--train_batch_size",
                               "2", "--cache_latents", "--seed", "1", "--learning_rate", "1e-3", "--lora_rank", "2",
                               "--max_train_steps", steps, "--save_every_n_steps", "1", "--checkpoints_total_limit",
                               "2"])
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and "-step" in p.name)
    # the second run's last two, and the first run's last two untouched
    assert [int(n[-8:]) for n in folders if not n.endswith("-state")] == [1, 2, 4, 5]

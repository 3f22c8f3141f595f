"""Two processes on the CPU (gloo) through `accelerate launch` with configs/accelerate/cpu_2proc.yaml.

train_network.py runs under tests/ddp_driver.py, which records each process's final weights, the
batches it trained on and every write it made under the output and logging folders.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import run_train_network, write_image_folder
from tests.test_train_network import base_args

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(tmp_path, record, watched: list, argv: list, script: str | None = None):
    """Run the script (train_network.py, or DDP_SCRIPT) on 2 CPU processes under tests/ddp_driver.py;
    check both ended with identical weights; returns (rank 0's weights, each rank's record)."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(REPO / "tests/ddp_driver.py"), str(record), os.pathsep.join(map(str, watched)), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    if script:
        env["DDP_SCRIPT"] = script
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = load_file(str(record / "rank0.safetensors")), load_file(str(record / "rank1.safetensors"))
    assert rank0 and rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    return rank0, [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_equal_one_process_with_the_doubled_batch(tiny_model, tmp_path):
    data = tmp_path / "data"
    # 6 images, 1 held out for validation: 5 training images make global batches of 2, 2 and 1, so the
    # last batch of every epoch leaves the second process without an image of its own (padded share)
    write_image_folder(data, "1_sks disk", count=6)
    common = ["--max_train_epochs=2", "--cache_latents", "--lr_scheduler=linear", "--lr_warmup_steps=1",
              "--val_split=0.2", "--save_top_k=1", "--save_every_n_steps=2", "--save_state", "--log_with=tensorboard"]
    one, one_logs = tmp_path / "one", tmp_path / "one_logs"
    run_train_network(base_args(tiny_model.single_file, data, one, *common, f"--logging_dir={one_logs}",
                                "--train_batch_size=2"))

    two, two_logs, record = tmp_path / "two", tmp_path / "two_logs", tmp_path / "record"
    argv = base_args(tiny_model.single_file, data, two, *common, f"--logging_dir={two_logs}")  # batch 1 each
    rank0, runs = launch_two(tmp_path, record, [two, two_logs], argv)  # identical weights on both
    rank0 = {k.removeprefix("network."): v for k, v in rank0.items()}

    # every training image once per epoch across the processes; the same number of batches on both
    per_epoch = []
    for epoch in (0, 1):
        batches = [[b for b in run["batches"] if b["epoch"] == epoch] for run in runs]
        assert len(batches[0]) == len(batches[1]) == 3
        own = [Path(p).name for run in batches for b in run if not b["shard"][3] for p in b["paths"]]
        assert len(own) == 5 and len(set(own)) == 5
        padded = [b for b in batches[1] if b["shard"][3]]
        assert len(padded) == 1 and padded[0]["shard"][:3] == [0, 1, 1]  # a copy with weight 0
        per_epoch.append(set(own))
    assert per_epoch[0] == per_epoch[1] and len({p.name for p in data.rglob("*.png")} - per_epoch[0]) == 1

    # only the main process wrote files, and it wrote the same set a single process does
    assert runs[1]["writes"] == [] and runs[0]["writes"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list(two_logs.rglob("events.out.tfevents.*"))) == 1

    # the same training as one process with twice the batch, up to float summation order (which
    # Adam magnifies a little where a gradient is about zero)
    a, b = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    start = load_file(str(one / "last-step00000002.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
        assert torch.equal(b[key], rank0[key].to(b[key].dtype)), key  # the file holds what the processes hold
    difference = sum((a[k].float() - b[k].float()).pow(2).sum() for k in a).sqrt()
    moved = sum((a[k].float() - start[k].float()).pow(2).sum() for k in a).sqrt()  # steps 3-6
    assert difference < 1e-3 * moved
    # the validation loss (one image: the second process had only a padded share) is the same number
    val = [json.loads((d / "last-top_k.json").read_text())["best_first"][0] for d in (one, two)]
    assert val[0]["step"] == val[1]["step"] and abs(val[0]["value"] - val[1]["value"]) < 1e-5
    assert json.loads((two / "last-state" / "train_state.json").read_text())["global_step"] == 6


def test_controlnet_two_processes_equal_one_process_with_the_doubled_batch(tiny_model, tmp_path):
    """train_controlnet.py (ControlNet stage) on 2 processes: identical ControlNets on both, every image
    once per epoch, only the main process writes (also the --log_images_every_n_steps grids, which
    only it generates), and the weights of one process with batch 2."""
    from safetensors import safe_open

    from tests.controlnet_support import radar_listing

    data = radar_listing(tmp_path / "radar", [((64, 64), (12 + 5 * i, 50 - 4 * i)) for i in range(6)], val=(5,))
    common = ["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--train_data_dir", str(data),
              "--resolution", "64", "--cache_latents", "--seed", "1",
              "--heatmap_sigma", "4", "--loss_weight_factor", "30", "--max_train_epochs", "2", "--save_state",
              "--mixed_precision", "no", "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.05"]
    from tests.test_controlnet_train import train

    zero = tmp_path / "zero"  # about the ControlNet before training (the flags refuse lr 0)
    train([*common, "--output_dir", str(zero), "--train_batch_size", "2", "--learning_rate", "1e-12"])
    one = tmp_path / "one"
    train([*common, "--output_dir", str(one), "--train_batch_size", "2", "--log_images_every_n_steps", "2"])

    two, record = tmp_path / "two", tmp_path / "record"
    rank0, runs = launch_two(tmp_path, record, [two], [*common, "--output_dir", str(two), "--train_batch_size", "1",
                                                       "--log_images_every_n_steps", "2"], "train_controlnet")
    for epoch in (0, 1):  # 5 training images: global batches of 2, 2 and 1 (padded share on rank 1)
        batches = [[b for b in run["batches"] if b["epoch"] == epoch] for run in runs]
        assert len(batches[0]) == len(batches[1]) == 3
        own = [Path(p).name for run in batches for b in run if not b["shard"][3] for p in b["paths"]]
        assert len(own) == 5 and len(set(own)) == 5
    assert runs[1]["writes"] == [] and runs[0]["writes"]
    assert sorted(p.name for p in two.iterdir() if p.name != "logs") == \
        sorted(p.name for p in one.iterdir() if p.name != "logs")
    grids = [f"last_images_{s:06d}.png" for s in (2, 4, 6)]
    assert sorted(p.name for p in (two / "sample").iterdir()) == sorted(p.name for p in (one / "sample").iterdir()) \
        == grids

    def controlnet_weights(folder):
        with safe_open(str(folder / "controlnet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}

    # Plain SGD here: a ControlNet starts with zero output convolutions, so its inner weights get
    # gradients of about zero at first, which Adam would scale up to whole steps in either direction
    # from float summation order alone (measured with AdamW: differences of a few lr).
    a, b, initial = controlnet_weights(one), controlnet_weights(two), controlnet_weights(zero)
    for key in a:
        assert torch.equal(b[key], rank0[f"controlnet.{key}"].to(b[key].dtype)), key
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = sum((a[k].float() - initial[k].float()).pow(2).sum() for k in a).sqrt()
    assert moved > 1e-3  # the comparison is about a run that trained


def test_dual_unet_two_processes_equal_one_process_with_the_doubled_batch(tiny_model, tmp_path):
    """train_dual_unet.py on 2 processes: identical LoRAs on both, every pair once per epoch, only the
    main process writes, and both LoRAs as one process with batch 2 trains them."""
    from library.dual_unet import toy

    data = toy.write_pair_dataset(tmp_path / "pairs", count=6, size=64)
    common = ["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--data_dir", str(data),
              "--resolution", "64", "--cache_latents", "--seed", "3", "--max_train_epochs", "2",
              "--validation_split", "0", "--sample_every", "0", "--validate_every", "0",
              "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.05", "--unet_lora_rank", "4"]
    import train_dual_unet
    from tests.test_controlnet_train import _reset_accelerate

    _reset_accelerate()
    one = train_dual_unet.main([*common, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "2"])

    two, record = tmp_path / "two", tmp_path / "record"
    rank0, runs = launch_two(tmp_path, record, [two], [*common, "--output_dir", str(two), "--train_batch_size", "1"],
                             "train_dual_unet")
    for epoch in (0, 1):  # 6 pairs: 3 global batches of 2, one pair per process
        batches = [[b for b in run["batches"] if b["epoch"] == epoch] for run in runs]
        assert len(batches[0]) == len(batches[1]) == 3
        own = [p for run in batches for b in run for p in b["paths"]]
        assert len(own) == 6 and len(set(own)) == 6
    assert runs[1]["writes"] == [] and runs[0]["writes"]
    for side, network in zip(one["dual"].modalities, one["dual"].networks):
        for key, value in network.state_dict().items():
            torch.testing.assert_close(rank0[f"lora_{side}.{key}"], value.detach().cpu(), rtol=1e-5, atol=1e-6,
                                       msg=key)
        up = [v for k, v in network.state_dict().items() if "lora_up" in k]
        assert sum(float(v.abs().sum()) for v in up) > 0  # lora_up starts at zero: this LoRA trained


def test_image_controlnet_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    """train_image_controlnet.py on 2 processes: identical models on both, every training pair once per
    epoch, only the main process writes, and the weights and metrics of one process with batch 4."""
    import train_image_controlnet
    from library.image_controlnet import toy

    data = toy.write_dataset(tmp_path / "data", train_identities=3, val_identities=1, views=3, size=16, seed=0)
    common = ["--data_dir", str(data), "--backbone", "small", "--image_size", "16", "--feature_dim", "32",
              "--num_workers", "0", "--epochs", "2", "--lr", "3e-3", "--gradient_accumulation_steps", "2",
              "--save_interval", "1", "--image_log_interval", "1"]
    one = tmp_path / "one"
    train_image_controlnet.main([*common, "--batch_size", "4", "--save_dir", str(one / "ck"),
                                 "--log_dir", str(one / "logs")])

    two, record = tmp_path / "two", tmp_path / "record"
    rank0, runs = launch_two(tmp_path, record, [two], [*common, "--batch_size", "2", "--save_dir", str(two / "ck"),
                                                       "--log_dir", str(two / "logs")], "train_image_controlnet")
    for epoch in (0, 1):  # 9 training pairs: global batches of 4, 4 and 1 (a padded share on rank 1)
        shares = [[b for b in run["batches"] if b["epoch"] == epoch] for run in runs]
        assert len(shares[0]) == len(shares[1]) == 3
        own = [i for run in shares for b in run if not b["shard"][3] for i in b["indices"]]
        assert sorted(own) == list(range(9))
        assert [b["shard"][3] for b in shares[1]] == [False, False, True]
    assert runs[1]["writes"] == [] and runs[0]["writes"]
    assert sorted(p.name for p in (two / "ck").iterdir()) == sorted(p.name for p in (one / "ck").iterdir())
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1

    a, b = (torch.load(d / "ck" / "checkpoint_epoch_2.pth", weights_only=True) for d in (one, two))
    start = torch.load(one / "ck" / "checkpoint_epoch_1.pth", weights_only=True)["model"]
    assert a["global_step"] == b["global_step"] == 4  # 2 steps per epoch: groups of 2 global batches
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], rank0[f"model.{key}"]), key  # the file holds what the processes hold
        # Adam divides by the gradient's own size, so two processes' other summation order moves single
        # weights by up to ~1e-4 (measured 1.1e-4 on one CPU, lr 3e-3); the whole model's difference is
        # bounded below against how far it moved
        torch.testing.assert_close(b["model"][key], value, rtol=1e-3, atol=5e-4, msg=key)
    difference = sum((a["model"][k].float() - b["model"][k].float()).pow(2).sum() for k in start).sqrt()
    moved = sum((a["model"][k].float() - start[k].float()).pow(2).sum() for k in start).sqrt()  # epoch 2
    assert difference < 1e-3 * moved
    for key in ("train_loss", "val_loss", "val_psnr"):  # metrics of all samples, gathered from both
        torch.testing.assert_close(torch.tensor(b["history"][key]), torch.tensor(a["history"][key]), rtol=1e-4,
                                   atol=0, msg=key)

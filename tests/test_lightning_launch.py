"""Lightning's --devices/--strategy/--num_nodes/--max_steps/--max_epochs on every trainer (library/launch.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library import args as A
from library.errors import UserError
from tests.helpers import write_image_folder
from tests.test_distributed import free_port
from tests.test_train_network import base_args

REPO = Path(__file__).resolve().parents[1]


def _parsers():
    import train_controlnet
    import train_dual_unet
    import train_image_controlnet
    import train_network

    return {m.__name__: m.setup_parser() for m in (train_network, train_controlnet, train_dual_unet,
                                                   train_image_controlnet)}


def test_every_trainer_accepts_lightnings_flags():
    for name, parser in _parsers().items():
        args = A.parse_args(parser, ["--devices", "1", "--strategy", "ddp", "--num_nodes", "1", "--max_epochs", "3"])
        assert (args.devices, args.strategy, args.num_nodes) == (1, "ddp", 1), name
        assert (args.epochs if name == "train_image_controlnet" else args.max_train_epochs) == 3, name
    args = A.parse_args(_parsers()["train_network"], ["--max_steps", "7"])
    assert args.max_train_steps == 7


def test_launch_command_and_its_errors(monkeypatch):
    from library import launch

    args = _parsers()["train_network"].parse_args(["--devices", "2", "--strategy", "ddp"])  # no relaunch here
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    cmd = launch.launch_command(args, "train_network.py", ["--devices", "2"])
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29999",
                       "train_network.py", "--devices", "2"]
    args.num_nodes = 2
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch.launch_command(args, "train_network.py", [])
    args.num_nodes, args.strategy = 1, "deepspeed"
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match="pip install deepspeed"):
            launch.launch_command(args, "train_network.py", [])
    else:
        assert str(launch.DEEPSPEED_CONFIG) in launch.launch_command(args, "train_network.py", [])


def test_devices_2_strategy_ddp_equals_accelerate_launch(tiny_model, tmp_path):
    """One command, `python train_network.py ... --devices 2 --strategy ddp`, trains as
    `accelerate launch --num_processes 2 train_network.py ...` does (2 CPU processes over gloo)."""
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    common = ["--max_train_steps=2", "--max_data_loader_n_workers=0"]

    ours = tmp_path / "ours"
    cmd = [sys.executable, str(REPO / "train_network.py"),
           *base_args(tiny_model.single_file, data, ours, *common, "--devices=2", "--strategy=ddp")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "MASTER_PORT": str(free_port())}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting 2 processes with accelerate launch" in proc.stdout
    assert "2 processes: each step trains on 2 x the batch size" in proc.stdout

    theirs = tmp_path / "theirs"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(REPO / "train_network.py"), *base_args(tiny_model.single_file, data, theirs, *common)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = load_file(str(ours / "last.safetensors")), load_file(str(theirs / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

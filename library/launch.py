"""Lightning's `--devices N --strategy ddp|deepspeed --num_nodes M`: one command starts the processes.

    python train_network.py ... --devices 2 --strategy ddp
    # is run as
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ... train_network.py ... --devices 2 ...

`relaunch_if_asked(args)` (called by library.args.parse_args) starts the same script under accelerate's
own launcher and exits with its status; the started processes see accelerate's environment (RANK,
WORLD_SIZE) and go on to train. `--strategy deepspeed` uses configs/accelerate/deepspeed_zero2.yaml and
needs the deepspeed package. Several nodes (--num_nodes) take Lightning's MASTER_ADDR, MASTER_PORT
and NODE_RANK from the environment. --devices 1 (or none) trains in this process, as before.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from library.errors import UserError

DEEPSPEED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "deepspeed_zero2.yaml"
STRATEGIES = ("auto", "ddp", "ddp_spawn", "deepspeed", "deepspeed_stage_2")


def under_launcher() -> bool:
    """True inside processes started by accelerate/torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def devices_count(value) -> int | None:
    """--devices: a number of processes per node; Lightning's 'auto' and -1 mean all GPUs (1 without)."""
    text = str(value).strip().lower()
    if text in ("auto", "-1"):
        import torch

        return max(1, torch.cuda.device_count())
    try:
        number = int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number of devices or 'auto', got {value!r}") from None
    if number < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number of devices >= 1 or 'auto', got {value!r}")
    return number


def launch_command(args, script: str, argv: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `script argv` as --devices x --num_nodes processes."""
    devices = args.devices or 1
    nodes = getattr(args, "num_nodes", None) or 1
    strategy = (getattr(args, "strategy", None) or "ddp").lower()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if strategy.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("--strategy deepspeed needs the deepspeed package, which is not installed.",
                            fix="pip install deepspeed (on a machine with CUDA), or use --strategy ddp.")
        cmd += ["--config_file", str(DEEPSPEED_CONFIG),
                "--gradient_accumulation_steps", str(getattr(args, "gradient_accumulation_steps", 1) or 1)]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(devices * nodes), "--num_machines", str(nodes),
            "--mixed_precision", getattr(args, "mixed_precision", None) or "no", "--dynamo_backend", "no"]
    if nodes > 1:
        if "MASTER_ADDR" not in os.environ:
            raise UserError(f"--num_nodes {nodes} needs the address of the first node.",
                            fix="set MASTER_ADDR (and MASTER_PORT, and NODE_RANK 0..N-1 on each node), as for "
                                "Lightning, and run the same command on every node.")
        cmd += ["--machine_rank", os.environ.get("NODE_RANK", "0"), "--main_process_ip", os.environ["MASTER_ADDR"]]
    if "MASTER_PORT" in os.environ:
        cmd += ["--main_process_port", os.environ["MASTER_PORT"]]
    return cmd + [script, *argv]


def relaunch_if_asked(args, argv: list[str]) -> None:
    """With --devices > 1 (or --num_nodes > 1) outside a launcher: run this script under accelerate's
    launcher with the same arguments and exit with its status. Otherwise return."""
    devices = getattr(args, "devices", None) or 1
    nodes = getattr(args, "num_nodes", None) or 1
    if devices * nodes <= 1 or under_launcher():
        return
    script = os.path.abspath(sys.argv[0])
    if not script.endswith(".py") or not os.path.isfile(script):
        raise UserError("--devices starts the script again under accelerate's launcher, so it must be run as a "
                        "script file (python train_network.py ...).",
                        fix="run the script file, or use accelerate launch --num_processes N yourself.")
    cmd = launch_command(args, script, list(argv))
    print(f"--devices {devices}" + (f" --num_nodes {nodes}" if nodes > 1 else "") +
          f": starting {devices * nodes} processes with accelerate launch", flush=True)
    raise SystemExit(subprocess.call(cmd))

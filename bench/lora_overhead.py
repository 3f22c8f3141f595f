#!/usr/bin/env python
"""CPU proxy for the per-module overhead of a LoRA training step: ops dispatched and time, LoRA vs bare.

On a GPU at batch 1 an eager LoRA step is launch-bound: the CPU's cost per dispatched op, not the
arithmetic, sets the step time. The tiny model (library.models.tiny: SD1.5's exact module structure,
192 kohya-style LoRA modules) at 8x8 latents has the same shape on a CPU: the arithmetic is small, so
a step costs about what its ops cost to dispatch. Measured here, with the trainer's own LoRA network
(networks.lora.create_network), param groups and optimizer (library.training.optim.build_optimizer,
AdamW by default; gradient clipping at --max_grad_norm as the trainer's loop):

  ops      aten ops dispatched per step, counted exactly with a TorchDispatchMode (every op the
           dispatcher runs below autograd, views included), split into forward / backward / optimizer:
             bare  frozen UNet forward + backward to the input latents (no optimizer)
             lora  the LoRA step: forward, backward into the LoRA weights, clip + optimizer step
  time     CPU seconds per step (process time: stable under time-slicing on a shared machine, with one
           thread), the bare step and the LoRA step timed alternately in one process (so a slower
           phase of the machine falls on both); ratio = median LoRA / median bare. Wall-clock times
           and their ratio are in the JSON too.

The issue's targets: ops ratio <= 1.5 (stretch 1.3), time ratio <= 1.4.

    python bench/lora_overhead.py                    # fp32, 8x8 latents, rank 32, 1 thread
    python bench/lora_overhead.py --dtype bf16       # under autocast, as --mixed_precision bf16

Prints the figures; writes bench/results/lora-overhead-<host>-<time>.json (atomically). Not a test.
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name (e.g. `aten.mm.default`)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Proxy:
    """The tiny UNet with the trainer's LoRA network on it; `bare_step` and `lora_step` run one step each.
    `phases` (a dict name -> context manager factory) lets a caller wrap each phase, e.g. in an OpCounter."""

    def __init__(self, rank: int = 32, latent: int = 8, batch: int = 1, dtype: str = "fp32", lr: float = 1e-4,
                 optimizer: str = "AdamW", max_grad_norm: float = 1.0, seed: int = 0):
        from argparse import Namespace

        from library.models.tiny import build_tiny_components
        from library.training.optim import build_optimizer
        from networks.lora import create_network

        self.dtype = DTYPES[dtype]
        unet, _, _ = build_tiny_components(seed)
        unet.requires_grad_(False)
        if self.dtype != torch.float32:
            unet.to(dtype=self.dtype)  # frozen base in the training dtype, as the trainer
        self.unet = unet
        network = create_network(1.0, rank, rank, None, None, unet)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        network.to(dtype=torch.float32)  # LoRA weights fp32 unless --full_bf16, as the trainer
        network.prepare_grad_etc(None, unet)
        network.on_epoch_start(None, unet)
        self.network = network
        groups = network.prepare_optimizer_params(None, lr, lr)
        opt_args = Namespace(optimizer_type=optimizer, optimizer_args=[], learning_rate=lr)
        self.optimizer, self.optimizer_desc = build_optimizer(opt_args, groups, "cpu")
        self.params = [p for g in groups for p in g["params"]]
        self.max_grad_norm = max_grad_norm
        g = torch.Generator().manual_seed(seed)
        cross = unet.config.cross_attention_dim
        self.latents = torch.randn(batch, 4, latent, latent, generator=g).to(self.dtype)
        self.hidden = torch.randn(batch, 77, cross, generator=g).to(self.dtype)
        self.target = torch.randn(batch, 4, latent, latent, generator=g)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=g)
        self.lora_modules = len(network.unet_loras)
        self._applied = True

    def _set_lora(self, on: bool):
        if on != self._applied:
            for module in self.network.unet_loras:
                module.apply_to() if on else module.restore()
            self._applied = on

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32)

    def bare_step(self, phase=None):
        phase = phase or (lambda name: _null())
        self._set_lora(False)
        x = self.latents.detach().requires_grad_(True)
        with phase("forward"):
            with self._autocast():
                pred = self.unet(x, self.timesteps, self.hidden).sample
                loss = torch.nn.functional.mse_loss(pred.float(), self.target)
        with phase("backward"):
            loss.backward()

    def lora_step(self, phase=None):
        phase = phase or (lambda name: _null())
        self._set_lora(True)
        with phase("forward"):
            with self._autocast():
                pred = self.unet(self.latents, self.timesteps, self.hidden).sample
                loss = torch.nn.functional.mse_loss(pred.float(), self.target)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PhaseTimer:
    """CPU seconds per phase, added up over calls: `step(timer.phase)`."""

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()

    def phase(self, name):
        timer = self

        class _Timed:
            def __enter__(self):
                self.t0 = time.process_time()

            def __exit__(self, *exc):
                timer.seconds[name] += time.process_time() - self.t0
                return False

        return _Timed()


def count_ops(step) -> dict[str, collections.Counter]:
    """Per phase, the ops one call of `step(phase)` dispatches."""
    counters: dict[str, OpCounter] = {}

    def phase(name):
        counters[name] = OpCounter()
        return counters[name]

    step(phase)
    return {name: c.counts for name, c in counters.items()}


def measure(rank=32, latent=8, batch=1, dtype="fp32", rounds=30, warmup=3, optimizer="AdamW",
            max_grad_norm=1.0) -> dict:
    proxy = Proxy(rank=rank, latent=latent, batch=batch, dtype=dtype, optimizer=optimizer,
                  max_grad_norm=max_grad_norm)
    for _ in range(2):  # first calls build caches (autocast, optimizer state): not what a step costs
        proxy.bare_step()
        proxy.lora_step()
    bare_ops, lora_ops = count_ops(proxy.bare_step), count_ops(proxy.lora_step)
    bare_total = sum(sum(c.values()) for c in bare_ops.values())
    lora_total = sum(sum(c.values()) for c in lora_ops.values())

    bare_s, lora_s, bare_wall, lora_wall = [], [], [], []
    for i in range(warmup + rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        proxy.bare_step()
        c1, t1 = time.process_time(), time.perf_counter()
        proxy.lora_step()
        c2, t2 = time.process_time(), time.perf_counter()
        if i >= warmup:
            bare_s.append(c1 - c0)
            lora_s.append(c2 - c1)
            bare_wall.append(t1 - t0)
            lora_wall.append(t2 - t1)
    # where the time goes, per phase (separate rounds: the phase timers' own cost stays out of the above)
    bare_phases, lora_phases = PhaseTimer(), PhaseTimer()
    for _ in range(rounds):
        proxy.bare_step(bare_phases.phase)
        proxy.lora_step(lora_phases.phase)

    bare_all = sum(bare_ops.values(), collections.Counter())
    lora_all = sum(lora_ops.values(), collections.Counter())
    extra = lora_all.copy()
    extra.subtract(bare_all)
    r = lambda v, n=4: round(v, n)  # noqa: E731
    return {
        "model": "tiny SD1.5-structured UNet (library.models.tiny)", "latent": latent, "batch_size": batch,
        "dtype": dtype, "rank": rank, "lora_modules": proxy.lora_modules,
        "lora_params": sum(p.numel() for p in proxy.params), "lora_tensors": len(proxy.params),
        "optimizer": proxy.optimizer_desc, "max_grad_norm": max_grad_norm, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ops": {"bare": {k: sum(v.values()) for k, v in bare_ops.items()} | {"total": bare_total},
                "lora": {k: sum(v.values()) for k, v in lora_ops.items()} | {"total": lora_total}},
        "ops_ratio": r(lora_total / bare_total, 3),
        "extra_ops_per_lora_module": r((lora_total - bare_total) / proxy.lora_modules, 2),
        "extra_ops_by_name": dict(sorted(((k, v) for k, v in extra.items() if v), key=lambda kv: -abs(kv[1]))),
        "rounds": rounds, "bare_step_s": [r(t, 5) for t in bare_s], "lora_step_s": [r(t, 5) for t in lora_s],
        "bare_s_median": r(statistics.median(bare_s), 5), "lora_s_median": r(statistics.median(lora_s), 5),
        "time_ratio": r(statistics.median(lora_s) / statistics.median(bare_s), 3),
        "time_ratio_min": r(min(lora_s) / min(bare_s), 3),
        "phase_s_mean": {"bare": {k: r(v / rounds, 5) for k, v in bare_phases.seconds.items()},
                         "lora": {k: r(v / rounds, 5) for k, v in lora_phases.seconds.items()}},
        "bare_wall_s": [r(t, 5) for t in bare_wall], "lora_wall_s": [r(t, 5) for t in lora_wall],
        "wall_ratio": r(statistics.median(lora_wall) / statistics.median(bare_wall), 3),
        "loadavg": r(os.getloadavg()[0], 2),
    }


def report(result: dict) -> str:
    ops = result["ops"]
    fmt = lambda d: " + ".join(f"{d[k]} {k}" for k in d if k != "total")  # noqa: E731
    top = list(result["extra_ops_by_name"].items())[:8]
    return "\n".join([
        f"tiny SD1.5 UNet, {result['latent']}x{result['latent']} latents, batch {result['batch_size']}, "
        f"{result['dtype']}, rank {result['rank']} on {result['lora_modules']} modules, {result['optimizer']}, "
        f"{result['threads']} thread(s)",
        f"ops/step  bare {ops['bare']['total']:6d} ({fmt(ops['bare'])})",
        f"          lora {ops['lora']['total']:6d} ({fmt(ops['lora'])})",
        f"          ratio {result['ops_ratio']:.3f}  ({result['extra_ops_per_lora_module']:.1f} extra ops per "
        f"LoRA module)",
        "          most extra: " + ", ".join(f"{k.removeprefix('aten.')} {v:+d}" for k, v in top),
        f"time      bare {result['bare_s_median'] * 1e3:.2f} ms, lora {result['lora_s_median'] * 1e3:.2f} ms "
        f"(medians of {result['rounds']}, alternated): ratio {result['time_ratio']:.3f} "
        f"(min/min {result['time_ratio_min']:.3f}; wall {result['wall_ratio']:.3f}), CPU time, "
        f"load average {result['loadavg']}",
        "          per phase (ms, mean): " + "; ".join(
            f"{step} " + " + ".join(f"{v * 1e3:.1f} {k}" for k, v in result["phase_s_mean"][step].items())
            for step in ("bare", "lora")),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--latent", type=int, default=8, help="latent height and width (8 = 64x64 px)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--optimizer_type", default="AdamW")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=30, help="timed bare+LoRA step pairs")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results_dir", default=str(BENCH / "results"))
    p.add_argument("--label", default="", help="a note stored in the JSON (what this run measures)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(args.threads)
    result = measure(args.rank, args.latent, args.batch_size, args.dtype, args.rounds, args.warmup,
                     args.optimizer_type, args.max_grad_norm)
    result["label"] = args.label
    from library.fileio import write_json_atomic

    host = socket.gethostname().split(".")[0] or "host"
    path = Path(args.results_dir) / f"lora-overhead-{host}-{time.strftime('%Y%m%d-%H%M%S')}-{args.dtype}.json"
    write_json_atomic(path, result)
    print(report(result))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

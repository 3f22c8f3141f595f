#!/usr/bin/env python
"""Speed of train_network.py, train_controlnet.py and train_dual_unet.py in one command.

Each trainer runs on the SD1.5 architecture with random weights (built offline once, cached) in a
subprocess of its own, so peak RSS and import time are clean. Per run it reports:

  s/step           median and min over steps 2..N (step k ends at the progress bar's k-th tick;
                   the runs log every step, i.e. one host sync per step, as kohya's default)
  time to first    split into interpreter start, import, model load, latent caching, the rest of
  step             the setup (network/optimizer), and the first step itself; against model load +
                   caching twice: as measured (ttfs/(l+c)), and less one steady step's work
                   ((ttfs-step)/(l+c): the startup's overhead, as a step on the CPU costs seconds)
  peak memory      peak RSS of the training (read before the bare steps run); peak CUDA memory
  caching          images per second through the VAE while latents are cached
  ratio            our median step / the median bare step of the same work, same process (below)
  FLOP/s           FLOPs of the bare same-work step / our median step; % of peak on known GPUs

"Same work" (the bare step, plain diffusers models built from the trainer's own configs, random
weights, the trainer's dtypes and autocast, no optimizer, no data loading):
  network     frozen UNet forward + backward to the input latents: activation gradients through
              every layer, no weight gradients (`ratio`). The LoRA's own matmuls are not in it (at
              rank 32, 5% of a 256x256 step's FLOPs), while its backward reaches below the first LoRA
              layer, where a LoRA step stops. `ratio_same_work` compares with the same bare step plus
              the trainer's LoRA modules (fp32 weights under autocast, weight gradients, no
              optimizer): what is left is the trainer's own cost. `ratio_full`: the UNet with all
              weight gradients (what a full fine-tune step computes).
  controlnet  ControlNet forward (weight gradients, fp32 weights under autocast as the trainer keeps
              them) + frozen UNet forward with its residuals + backward into the ControlNet.
  dual_unet   two frozen UNet forward + backward passes to their inputs (one per modality);
              `ratio_same_work` adds each UNet's LoRA modules, as for network.
The bare step and the bare step with LoRA are timed alternately, one after the other, so that a
slower or faster phase of a shared machine falls on both.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one bare same-work step on the meta device at
the run's shape (matmul, convolution and attention matmuls; norms and element-wise ops are not
counted, the usual convention for model FLOP utilisation). SD1.5, 512x512, batch 1: forward 0.803
TFLOP, frozen forward+backward 1.726 TFLOP. Peak: vendor dense bf16/fp16 tensor-core figures
(GPU_PEAK_TFLOPS below, or --peak_tflops); none for CPUs.

    python bench/run_all.py                       # CPU: 256x256, batch 1, fp32 and bf16, 8 steps
    python bench/run_all.py --trainers network --precisions fp32 --steps 6
    python bench/run_all.py --quick               # tiny model, 64x64, 3 steps: a smoke run (seconds)
    python bench/run_all.py                       # on a GPU: 512x512, batch 1 and 16, bf16 and fp16

Writes bench/results/<host>-<time>.json (atomically) and prints a short table. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TRAINERS = ("network", "controlnet", "dual_unet")
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first
# matching substring of torch.cuda.get_device_name() wins.
GPU_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                   ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
                   ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0)]
FIELDS = ("step_s_median", "step_s_min", "steps_measured", "interpreter_s", "import_s", "model_load_s", "caching_s",
          "setup_other_s", "first_step_s", "time_to_first_step_s", "time_to_first_step_from_launch_s",
          "ttfs_over_load_and_caching", "startup_over_load_and_caching", "peak_rss_gib", "peak_cuda_gib",
          "cached_images", "caching_images_per_s",
          "bare_step_s_median", "bare_step_s_min", "ratio", "ratio_min", "bare_lora_step_s_median",
          "ratio_same_work", "lora_flops_share", "bare_flops", "tflops_per_s", "percent_of_peak")


# --- assets (built once in the cache folder, before any timing) -------------------------------------

def write_images(folder: Path, size: int, count: int, seed: int = 0, caption: str | None = "a photo of a thing"):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        if caption is not None:
            (folder / f"{i:04d}.txt").write_text(caption, encoding="utf-8")


def prepare_model(cache: Path, quick: bool) -> Path:
    if quick:
        from library.models.tiny import write_tiny_model

        paths = cache / "tiny"
        if not (paths / "tiny-sd15" / "model_index.json").is_file():
            write_tiny_model(paths)
        return paths / "tiny-sd15"
    return build_sd15_checkpoint(cache.parent / "sd15-random-fp16.safetensors")


def build_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A single-file SD1.5 checkpoint with random weights (fp16, as the usual 2 GB files)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.arch import model_kwargs, shipped_config
    from library.models.saving import save_sd_checkpoint

    if path.exists():
        return path
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**model_kwargs(shipped_config("unet")))
    vae = AutoencoderKL(**model_kwargs(shipped_config("vae")))
    te = CLIPTextModel(CLIPTextConfig(**model_kwargs(shipped_config("text_encoder"))))
    save_sd_checkpoint(path, unet, te, vae, dtype=torch.float16)
    return path


def prepare_data(cache: Path, trainer: str, size: int, count: int) -> Path:
    """The trainer's data layout with `count` random images (pairs for dual_unet) of size x size."""
    root = cache / f"{trainer}-{size}px-{count}"
    done = root / ".done"
    if done.is_file():
        return root
    if trainer == "network":
        write_images(root / "1_thing", size, count)
    elif trainer == "controlnet":
        write_images(root / "train" / "1_thing", size, count)
        write_images(root / "cond", size, count, seed=1, caption=None)
    else:
        write_images(root / "cf", size, count, caption=None)
        write_images(root / "fa", size, count, seed=1, caption=None)
    done.write_text("ok")
    return root


def trainer_argv(trainer: str, model: Path, data: Path, out: str, resolution: int, batch: int, steps: int,
                 precision: str, rank: int) -> list[str]:
    common = [f"--pretrained_model_name_or_path={model}", f"--output_dir={out}", f"--resolution={resolution}",
              f"--train_batch_size={batch}", f"--mixed_precision={PRECISIONS[precision]}", "--cache_latents",
              "--seed=0", "--log_every_n_steps=1", "--max_data_loader_n_workers=0"]
    if trainer == "network":
        return common + [f"--train_data_dir={data}", "--network_module=networks.lora", f"--network_dim={rank}",
                         "--network_train_unet_only", "--caption_extension=.txt", "--learning_rate=1e-4",
                         f"--max_train_steps={steps}"]
    if trainer == "controlnet":  # stage "controlnet": the ControlNet trains, everything else is frozen
        return common + [f"--train_data_dir={data / 'train'}", f"--conditioning_data_dir={data / 'cond'}",
                         "--conditioning_type=image", "--caption_extension=.txt", "--learning_rate=1e-5",
                         f"--max_train_steps={steps}"]
    # no validation pass (the default validates the base before step 1) and no sample pairs: the
    # figures are of training steps
    return common + [f"--data_dir={data}", f"--unet_lora_rank={rank}", f"--max_steps={steps}",
                     "--validation_split=0", "--validate_every=0", "--sample_every=0"]


# --- the worker: one trainer run, instrumented, then the bare step in the same process --------------

class Probe:
    """Timers around the trainers' phases, by wrapping library functions at run time (no edits)."""

    def __init__(self):
        self.load_s = self.cache_s = 0.0
        self.cache_images = 0
        self.caching = False
        self.loop_start = None
        self.step_ends: list[float] = []
        self.unet_config = self.controlnet_config = None

    def install(self):
        import diffusers
        import library.data.latents as latents
        import library.models.loading as loading
        from library.controlnet import model as cn_model
        from library.logs import ProgressLogger

        probe = self
        load, cache, create_cn = loading.load_sd_model, latents.cache_latents, cn_model.create_controlnet
        encode = diffusers.AutoencoderKL.encode
        start, tick = ProgressLogger.start, ProgressLogger.tick

        def load_sd_model(*a, **k):
            t0 = time.perf_counter()
            model = load(*a, **k)
            probe.load_s += time.perf_counter() - t0
            probe.unet_config = dict(model.unet.config)
            return model

        def cache_latents(*a, **k):
            t0 = time.perf_counter()
            probe.caching = True
            try:
                return cache(*a, **k)
            finally:
                probe.caching = False
                probe.cache_s += time.perf_counter() - t0

        def vae_encode(self, x, *a, **k):
            if probe.caching:
                probe.cache_images += int(x.shape[0])
            return encode(self, x, *a, **k)

        def create_controlnet(*a, **k):
            net = create_cn(*a, **k)
            probe.controlnet_config = dict(net.config)
            return net

        def progress_start(self, *a, **k):
            if probe.loop_start is None:
                probe.loop_start = time.perf_counter()
            return start(self, *a, **k)

        def progress_tick(self):
            probe.step_ends.append(time.perf_counter())
            return tick(self)

        loading.load_sd_model, latents.cache_latents, cn_model.create_controlnet = \
            load_sd_model, cache_latents, create_controlnet
        diffusers.AutoencoderKL.encode = vae_encode
        ProgressLogger.start, ProgressLogger.tick = progress_start, progress_tick


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def bare_step(kind: str, unet, controlnet, batch: int, resolution: int, precision: str, device, full: bool = False):
    """One callable that runs one bare step of `kind` (see the module docstring); inputs made once."""
    import torch

    dtype = _dtype(precision)
    h = resolution // 8
    ctx_dim = unet.config.cross_attention_dim
    latents = [torch.randn(batch, 4, h, h, device=device, dtype=dtype) for _ in range(2 if kind == "dual_unet" else 1)]
    hidden = torch.randn(batch, 77, ctx_dim, device=device, dtype=dtype)
    cond = torch.rand(batch, 3, resolution, resolution, device=device, dtype=dtype)
    # FLOPs do not depend on the dtype: the meta device counts in fp32, without autocast
    autocast = torch.autocast("cpu" if device.type == "meta" else device.type, dtype=dtype,
                              enabled=dtype != torch.float32 and device.type != "meta")
    t = torch.randint(0, 1000, (batch,), device=device) if device.type != "meta" else torch.zeros(batch, device=device,
                                                                                                    dtype=torch.long)

    def step():
        loss = 0
        with autocast:
            if kind == "controlnet":
                down, mid = controlnet(latents[0], t, encoder_hidden_states=hidden, controlnet_cond=cond,
                                       return_dict=False)
                pred = unet(latents[0], t, hidden, down_block_additional_residuals=[d.to(dtype) for d in down],
                            mid_block_additional_residual=mid.to(dtype)).sample
                loss = pred.float().pow(2).mean()
            else:
                for x in latents:
                    x = x.detach().requires_grad_(not full)
                    loss = loss + unet(x, t, hidden).sample.float().pow(2).mean()
        loss.backward()
        for module in (unet, controlnet):
            if module is not None:
                module.zero_grad(set_to_none=True)

    return step


def build_bare_models(kind: str, unet_config: dict, controlnet_config: dict | None, precision: str, device,
                      full: bool = False):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    dtype = _dtype(precision)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        controlnet = ControlNetModel.from_config(controlnet_config) if kind == "controlnet" else None
    unet.to(dtype=dtype).requires_grad_(full)
    if controlnet is not None:
        controlnet.to(dtype=torch.float32).requires_grad_(True)  # trained: fp32 weights, autocast as the trainer
    return unet, controlnet


def add_lora(unet, rank: int, device):
    """The trainers' LoRA modules on `unet` (fp32, trainable, as train_network keeps them); returns them.
    `restore()` on each takes them off again."""
    import torch

    from networks.lora import create_network

    network = create_network(1.0, rank, rank, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.to(device, dtype=torch.float32)
    torch.nn.init.normal_(next(iter(network.unet_loras)).lora_up.weight)  # any non-zero: no effect on time
    return network.unet_loras


def count_flops(kind: str, unet_config: dict, controlnet_config: dict | None, batch: int, resolution: int,
                precision: str, lora_rank: int | None = None) -> float:
    """FLOPs of one bare step; with `lora_rank`, of the bare step with the LoRA modules on."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    unet, controlnet = build_bare_models(kind, unet_config, controlnet_config, "fp32", meta)
    step = bare_step(kind, unet, controlnet, batch, resolution, "fp32", meta)
    if lora_rank:
        add_lora(unet, lora_rank, meta)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_bare(kind, unet_config, controlnet_config, batch, resolution, precision, device, steps, full=False,
              lora_rank: int | None = None):
    """Seconds per bare step, the first (warm-up) left out. With `lora_rank`, also the bare step with the
    LoRA modules on, the two timed alternately: returns (bare, bare_with_lora), else (bare, None)."""
    import torch

    unet, controlnet = build_bare_models(kind, unet_config, controlnet_config, precision, device, full)
    step = bare_step(kind, unet, controlnet, batch, resolution, precision, device, full)
    loras = add_lora(unet, lora_rank, device) if lora_rank else []

    def timed(with_lora: bool) -> float:
        for module in loras:
            module.apply_to() if with_lora else module.restore()
        t0 = time.perf_counter()
        step()
        for module in loras:
            module.zero_grad(set_to_none=True)  # as the trainer's optimizer step, not accumulated
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times, lora_times = [], []
    for _ in range(steps):
        times.append(timed(False))
        if loras:
            lora_times.append(timed(True))
    del unet, controlnet, step, loras
    return times[1:], (lora_times[1:] if lora_rank else None)  # the first is a warm-up, as the trainer's step 1


def gpu_peak(name: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if precision == "fp32":
        return None  # tensor-core fp32 peaks depend on TF32 settings: not guessed
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def worker(spec: dict) -> dict:
    interpreter_s = max(0.0, time.time() - spec["spawned_at"])  # process start, this file's own imports
    t_import = time.perf_counter()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import library.training.loop  # noqa: F401  (what every trainer imports, so it counts as import)
    if spec["trainer"] == "network":
        import train_network as script
        import library.lora.trainer  # noqa: F401
    elif spec["trainer"] == "controlnet":
        import train_controlnet as script
        import library.controlnet.stages  # noqa: F401
        import library.controlnet.trainer  # noqa: F401
    else:
        import train_dual_unet as script
        import library.dual_unet.trainer  # noqa: F401
    import_s = time.perf_counter() - t_import

    probe = Probe()
    probe.install()
    device = torch.device("cuda" if torch.cuda.is_available() and not spec["cpu"] else "cpu")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        argv = trainer_argv(spec["trainer"], Path(spec["model"]), Path(spec["data"]), out, spec["resolution"],
                            spec["batch_size"], spec["steps"], spec["precision"], spec["rank"])
        t_main = time.perf_counter()
        script.main(argv)
        t_trained = time.perf_counter()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    peak_cuda = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    ends = probe.step_ends
    if len(ends) < 2 or probe.loop_start is None:
        raise RuntimeError(f"the trainer ran {len(ends)} steps; at least 2 are needed")
    steps = [b - a for a, b in zip(ends, ends[1:])]
    ttfs = ends[0] - t_main
    load_cache = probe.load_s + probe.cache_s

    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kind, cfgs = spec["trainer"], (probe.unet_config, probe.controlnet_config)
    geometry = (spec["batch_size"], spec["resolution"], spec["precision"])
    lora_rank = spec["rank"] if kind in ("network", "dual_unet") else None
    t_bare = time.perf_counter()
    bare, bare_lora = time_bare(kind, *cfgs, *geometry, device, spec["bare_steps"], lora_rank=lora_rank)
    bare_full = None
    if kind == "network" and spec["bare_full"]:
        bare_full, _ = time_bare(kind, *cfgs, *geometry, device, max(2, spec["bare_steps"] // 2 + 1), full=True)
    t_flops = time.perf_counter()
    flops = count_flops(kind, *cfgs, *geometry)
    lora_flops = count_flops(kind, *cfgs, *geometry, lora_rank=lora_rank) if lora_rank else None
    t_done = time.perf_counter()
    med = statistics.median(steps)
    tflops = flops / med / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    peak = gpu_peak(name, spec["precision"], spec.get("peak_tflops")) if device.type == "cuda" else None
    r = lambda v, n=4: None if v is None else round(v, n)  # noqa: E731
    result = {
        "trainer": kind, "script": f"train_{kind}.py", "device": device.type, "device_name": name,
        "threads": torch.get_num_threads(), "precision": spec["precision"], "resolution": spec["resolution"],
        "batch_size": spec["batch_size"], "rank": spec["rank"] if kind != "controlnet" else None,
        "steps": spec["steps"], "steps_measured": len(steps), "step_times_s": [r(s) for s in steps],
        "step_s_median": r(med), "step_s_min": r(min(steps)),
        "interpreter_s": r(interpreter_s, 3), "import_s": r(import_s, 3), "model_load_s": r(probe.load_s, 3),
        "caching_s": r(probe.cache_s, 3), "setup_other_s": r(probe.loop_start - t_main - load_cache, 3),
        "first_step_s": r(ends[0] - probe.loop_start, 3), "time_to_first_step_s": r(ttfs, 3),
        "time_to_first_step_from_launch_s": r(interpreter_s + import_s + ttfs, 3),
        "ttfs_over_load_and_caching": r(ttfs / load_cache, 3) if load_cache > 0 else None,
        "startup_over_load_and_caching": r((ttfs - med) / load_cache, 3) if load_cache > 0 else None,
        "peak_rss_gib": r(peak_rss, 3), "peak_cuda_gib": r(peak_cuda, 3),
        "cached_images": probe.cache_images,
        "caching_images_per_s": r(probe.cache_images / probe.cache_s, 3) if probe.cache_s > 0 else None,
        "bare": {"network": "frozen UNet fwd+bwd to input", "controlnet": "ControlNet (grads) + frozen UNet fwd+bwd",
                 "dual_unet": "2 x frozen UNet fwd+bwd to input"}[kind],
        "bare_step_s_median": r(statistics.median(bare)), "bare_step_s_min": r(min(bare)),
        "ratio": r(med / statistics.median(bare), 3), "ratio_min": r(min(steps) / min(bare), 3),
        "bare_lora_step_s_median": r(statistics.median(bare_lora)) if bare_lora else None,
        "ratio_same_work": r(med / statistics.median(bare_lora), 3) if bare_lora else None,
        "lora_time_share": r(statistics.median(bare_lora) / statistics.median(bare) - 1, 3) if bare_lora else None,
        "lora_flops_share": r(lora_flops / flops - 1, 4) if lora_flops else None,
        "bare_full_step_s_median": r(statistics.median(bare_full)) if bare_full else None,
        "ratio_full": r(med / statistics.median(bare_full), 3) if bare_full else None,
        "bare_flops": flops, "tflops_per_s": r(tflops, 5), "peak_tflops": peak,
        "percent_of_peak": r(100 * tflops / peak, 2) if peak else None,
        "wall_s": {"training_run": r(t_trained - t_main, 2), "after_last_step": r(t_trained - ends[-1], 2),
                   "bare": r(t_flops - t_bare, 2), "flop_count": r(t_done - t_flops, 2)},
        "loadavg_before": r(load_before, 2), "loadavg_after": r(os.getloadavg()[0], 2),
    }
    return result


# --- the driver ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    p.add_argument("--resolution", type=int, default=None, help="default 256 on CPU, 512 on a GPU, 64 with --quick")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="default 1 on CPU, 1 and 16 on a GPU")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8 on CPU, 30 on a GPU)")
    p.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                   help="default fp32 bf16 on CPU, bf16 fp16 on a GPU")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (network, dual_unet)")
    p.add_argument("--bare_steps", type=int, default=None, help="bare steps timed (default: --steps)")
    p.add_argument("--no_bare_full", action="store_true", help="skip the all-weight-gradients bare UNet (network)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run (default: torch's)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for %% of peak (default: known GPUs)")
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64, 3 steps, fp32: a smoke run")
    p.add_argument("--cache_dir", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "sdt_bench")))
    p.add_argument("--results_dir", default=str(BENCH / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_json_atomic(path: Path, data) -> None:
    from library.fileio import write_json_atomic as write

    write(path, data)


def table(runs: list[dict]) -> str:
    cols = [("trainer", "trainer", "{}"), ("prec", "precision", "{}"), ("res", "resolution", "{}"),
            ("bs", "batch_size", "{}"), ("s/step med", "step_s_median", "{:.3f}"), ("min", "step_s_min", "{:.3f}"),
            ("bare", "bare_step_s_median", "{:.3f}"), ("ratio", "ratio", "{:.2f}"),
            ("+lora", "bare_lora_step_s_median", "{:.3f}"), ("same work", "ratio_same_work", "{:.2f}"),
            ("full", "ratio_full", "{:.2f}"),
            ("import", "import_s", "{:.1f}"), ("load", "model_load_s", "{:.1f}"), ("cache", "caching_s", "{:.1f}"),
            ("other", "setup_other_s", "{:.1f}"), ("step1", "first_step_s", "{:.1f}"),
            ("ttfs", "time_to_first_step_s", "{:.1f}"), ("ttfs/(l+c)", "ttfs_over_load_and_caching", "{:.2f}"),
            ("(ttfs-step)/(l+c)", "startup_over_load_and_caching", "{:.2f}"),
            ("img/s", "caching_images_per_s", "{:.2f}"), ("RSS GiB", "peak_rss_gib", "{:.1f}"),
            ("CUDA GiB", "peak_cuda_gib", "{:.1f}"), ("TFLOP/s", "tflops_per_s", "{:.3f}"),
            ("%peak", "percent_of_peak", "{:.1f}")]
    if not any(run.get("peak_cuda_gib") is not None for run in runs):
        cols = [c for c in cols if c[1] not in ("peak_cuda_gib", "percent_of_peak")]
    rows = [[h for h, _, _ in cols]]
    for run in runs:
        if "error" in run:
            rows.append([run["trainer"], run["precision"], str(run["resolution"]), str(run["batch_size"]),
                         "error: " + run["error"]])
            continue
        rows.append([("-" if run.get(k) is None else f.format(run[k])) for _, k, f in cols])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(cols))]
    lines = ["| " + " | ".join(c.rjust(widths[i]) if i >= 4 else c.ljust(widths[i]) for i, c in enumerate(row)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker:
        spec = json.loads(Path(opts.worker).read_text())
        result = worker(spec)
        write_json_atomic(Path(spec["result"]), result)
        return 0

    if opts.steps is not None and opts.steps < 2:
        raise SystemExit("--steps must be at least 2 (steps 2..N are measured)")
    import torch

    cuda = torch.cuda.is_available() and not opts.cpu
    if opts.quick:
        resolution, batches, steps, precisions = 64, [1], 3, ["fp32"]
    elif cuda:
        resolution, batches, steps, precisions = 512, [1, 16], 30, ["bf16", "fp16"]
    else:
        resolution, batches, steps, precisions = 256, [1], 8, ["fp32", "bf16"]
    resolution = opts.resolution or resolution
    batches = opts.batch_sizes or batches
    steps = opts.steps or steps
    precisions = opts.precisions or precisions
    cache = Path(opts.cache_dir) / ("quick" if opts.quick else "sd15")
    cache.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    print(f"preparing the model and data in {cache} ...", flush=True)
    model = prepare_model(cache, opts.quick)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0] or "host"
    report = {"host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "cuda": cuda,
              "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "quick": opts.quick, "model": "tiny SD1.5-structured (library.models.tiny)" if opts.quick
              else "SD1.5 architecture, random weights (fp16 single file)",
              "loadavg_start": list(os.getloadavg()), "runs": []}
    runs = report["runs"]
    with tempfile.TemporaryDirectory() as work:
        for trainer in opts.trainers:
            for batch in batches:
                count = max(2, min(steps * batch, 64))  # one epoch per run where it fits
                data = prepare_data(cache, trainer, resolution, count)
                for precision in precisions:
                    tag = f"{trainer}-{precision}-{resolution}px-b{batch}"
                    spec = {"trainer": trainer, "model": str(model), "data": str(data), "resolution": resolution,
                            "batch_size": batch, "steps": steps, "precision": precision, "rank": opts.rank,
                            "bare_steps": opts.bare_steps or steps, "bare_full": not opts.no_bare_full,
                            "cpu": not cuda, "threads": opts.threads, "peak_tflops": opts.peak_tflops,
                            "result": str(Path(work) / f"{tag}.json")}
                    spec_path = Path(work) / f"{tag}.spec.json"
                    spec_path.write_text(json.dumps(spec))
                    log_path = Path(work) / f"{tag}.log"
                    print(f"running {tag} ...", flush=True)
                    spec["spawned_at"] = time.time()
                    spec_path.write_text(json.dumps(spec))
                    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
                    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network
                    with open(log_path, "w") as log:
                        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                               str(spec_path)], cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                              env=env)
                    if proc.returncode != 0 or not Path(spec["result"]).is_file():
                        tail = log_path.read_text(errors="replace")[-3000:]
                        print(f"{tag} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
                        runs.append({"trainer": trainer, "precision": precision, "resolution": resolution,
                                     "batch_size": batch, "error": f"exit {proc.returncode}", "log_tail": tail})
                        continue
                    runs.append(json.loads(Path(spec["result"]).read_text()))
    report["loadavg_end"] = list(os.getloadavg())
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(opts.results_dir) / f"{host}-{stamp}.json"
    write_json_atomic(path, report)
    print()
    print(table(runs))
    print(f"\nload average at start / end: {' '.join(f'{v:.2f}' for v in report['loadavg_start'])} / "
          f"{' '.join(f'{v:.2f}' for v in report['loadavg_end'])} ({os.cpu_count()} CPUs)")
    print(f"results: {path}")
    return 1 if any("error" in run for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

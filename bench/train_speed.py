#!/usr/bin/env python
"""train_network.py speed on the SD1.5 architecture (random weights), against a bare UNet step.

Prints seconds per step (median and min over steps 2..N), time to first step split into model
load and latent caching, peak RSS (and peak GPU memory on CUDA), and the ratio of our training
step to a bare UNet forward+backward of the same shape measured in the same process: the bare
step is the frozen UNet's forward and backward to its input, which is the work a LoRA step
cannot avoid. Target: ratio <= 1.10.

    python bench/train_speed.py                      # CPU: 256x256, batch 1, fp32
    python bench/train_speed.py --resolution 512 --mixed_precision bf16 --steps 30   # e.g. on a GPU

Writes a JSON with the figures when --json is given. Not a test: it only measures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def write_images(folder: Path, size: int, count: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a thing", encoding="utf-8")


def bare_unet_step_times(resolution: int, batch: int, steps: int, mixed_precision: str, device) -> list[float]:
    """Frozen SD1.5 UNet: forward + backward to the input latents, same shapes as the training step."""
    import torch
    from diffusers import UNet2DConditionModel

    from library.models.arch import model_kwargs, shipped_config

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    unet = UNet2DConditionModel(**model_kwargs(shipped_config("unet"))).to(device, dtype=dtype)
    unet.requires_grad_(False)
    h = resolution // 8
    latents = torch.randn(batch, 4, h, h, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    target = torch.randn_like(latents)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        x = latents.clone().requires_grad_(True)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(x, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del unet
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--network_dim", type=int, default=32)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--cache_dir", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "sdt_bench")))
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--extra", nargs="*", default=[], help="extra train_network.py flags, e.g. --extra=--torch_compile")
    opts = parser.parse_args()

    t_import = time.perf_counter()
    import torch

    import train_network
    t_import = time.perf_counter() - t_import

    cache = Path(opts.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = build_sd15_checkpoint(cache / "sd15-random-fp16.safetensors")
    data = cache / f"data{opts.resolution}"
    if not data.exists():
        write_images(data / "1_thing", opts.resolution, max(4, opts.batch_size))

    with tempfile.TemporaryDirectory() as out:
        argv = [f"--pretrained_model_name_or_path={ckpt}", f"--train_data_dir={data}", f"--output_dir={out}",
                f"--resolution={opts.resolution}", "--network_module=networks.lora",
                f"--network_dim={opts.network_dim}", f"--train_batch_size={opts.batch_size}",
                f"--max_train_steps={opts.steps}", f"--mixed_precision={opts.mixed_precision}", "--cache_latents",
                "--network_train_unet_only", "--caption_extension=.txt", "--seed=0", "--learning_rate=1e-4",
                "--log_every_n_steps=1", *opts.extra]  # a sync per step: honest per-step GPU times
        result = train_network.main(argv)
    ends = result["step_end_times"]
    steps = [b - a for a, b in zip(ends, ends[1:])]   # step 2..N
    first_step = ends[0] - result["started_at"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    bare = bare_unet_step_times(opts.resolution, opts.batch_size, opts.steps, opts.mixed_precision, device)[1:]

    ours_med, bare_med = statistics.median(steps), statistics.median(bare)
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "resolution": opts.resolution, "batch_size": opts.batch_size, "network_dim": opts.network_dim,
        "mixed_precision": opts.mixed_precision, "steps_measured": len(steps),
        "step_s_median": round(ours_med, 4), "step_s_min": round(min(steps), 4),
        "bare_unet_step_s_median": round(bare_med, 4), "bare_unet_step_s_min": round(min(bare), 4),
        "ratio_median": round(ours_med / bare_med, 3), "ratio_min": round(min(steps) / min(bare), 3),
        "import_s": round(t_import, 2), "model_load_s": round(result["model_load_s"], 2),
        "caching_s": round(result["caching_s"], 2), "time_to_first_step_s": round(first_step, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(peak_gpu, 2) if peak_gpu is not None else None,
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key.ljust(width)}  {value}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

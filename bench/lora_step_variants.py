#!/usr/bin/env python
"""Time one SD1.5 LoRA training step (UNet forward + backward + AdamW) in several execution modes.

Random SD1.5-shaped UNet, kohya-style LoRA (192 modules), cached-latent inputs. Modes:
  bare        frozen UNet, forward + backward to the input (the floor a LoRA step cannot beat)
  eager       our LoRA as train_network.py runs it (fp32 LoRA weights under autocast)
  eager_lp    LoRA weights in the low-precision dtype too (what --full_bf16 does)
  compile     torch.compile of the UNet (default mode)
  graphs      torch.compile mode="reduce-overhead" (CUDA graphs)
Prints ms/step (median of the timed steps) per mode. A measurement for the performance work, not a test.

    python bench/lora_step_variants.py --resolution 512 --dtype bf16 --modes bare eager eager_lp compile graphs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_unet(dtype, device):
    from diffusers import UNet2DConditionModel

    from library.models.arch import model_kwargs, shipped_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**model_kwargs(shipped_config("unet"))).to(device, dtype=dtype)
    unet.requires_grad_(False)
    return unet


def time_mode(mode: str, args, device) -> float:
    import networks.lora as lora

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    unet = build_unet(dtype, device)
    h = args.resolution // 8
    latents = torch.randn(args.batch_size, 4, h, h, device=device, dtype=dtype)
    hidden = torch.randn(args.batch_size, 77, 768, device=device, dtype=dtype)
    target = torch.randn_like(latents)
    params = []
    if mode != "bare":
        net = lora.create_network(1.0, args.rank, args.rank, None, None, unet)
        net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        net.to(device, dtype=dtype if mode == "eager_lp" else torch.float32)
        params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None
    model = unet
    if mode in ("compile", "graphs"):
        model = torch.compile(unet, mode="reduce-overhead" if mode == "graphs" else None)

    def step():
        x = latents.clone().requires_grad_(mode == "bare")
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = model(x, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    del model, unet, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["bare", "eager", "eager_lp", "compile", "graphs"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.resolution}px batch {args.batch_size} {args.dtype} rank {args.rank}")
    for mode in args.modes:
        try:
            ms = time_mode(mode, args, device) * 1000
            print(f"{mode:10s} {ms:8.1f} ms/step", flush=True)
        except Exception as err:  # a mode that fails to compile is a finding, not a crash
            print(f"{mode:10s} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

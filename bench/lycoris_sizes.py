#!/usr/bin/env python
"""LoRA vs LoHa / LoKr / DoRA: parameters, file size, and CPU seconds per training step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lycoris_sizes.py [--steps 5]

Sizes for the tiny test model and for SD1.5's shapes (built on the meta device: no memory, no
weights); the file size is the fp16 tensor bytes (the header adds a few tens of KiB). The s/step
is one forward + backward + AdamW step of the tiny U-Net and text encoder with the network, batch
4 at 32x32 latents, on this machine's CPU (the mean of --steps after one warm-up step).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {  # the usual settings: LoRA dim 16, LoHa dim 8, LoKr factor 8 (full factors), DoRA rank 16
    "lora 16": (16, 16, {"algo": "lora"}),
    "loha 8": (8, 4, {"algo": "loha"}),
    "lokr f8": (100000, 1, {"algo": "lokr", "factor": "8"}),
    "lokr f8 r8": (8, 4, {"algo": "lokr", "factor": "8"}),
    "dora 16": (16, 16, {"algo": "dora"}),
}


def build(unet, vae, te, dim, alpha, args, preset):
    from networks import lycoris

    kwargs = dict(args, preset=preset)
    if preset == "full":
        kwargs.update(conv_dim=str(min(dim, 8)), conv_alpha=str(min(alpha, 4)))
    return lycoris.create_network(1.0, dim, alpha, vae, te, unet, **kwargs)


def sizes(make_models, label):
    import torch

    rows = []
    for preset in ("attn-mlp", "full"):
        for name, (dim, alpha, args) in CONFIGS.items():
            unet, vae, te = make_models()
            net = build(unet, vae, te, dim, alpha, args, preset)
            params = sum(p.numel() for p in net.parameters())
            tensors = sum(v.numel() for v in net.state_dict().values())
            rows.append((label, preset, name, len(net.all_loras()), params, tensors * 2 / 2 ** 20))
            del net, unet, vae, te
    torch.set_default_device(None)
    return rows


def sd15_models():
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import arch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.model_kwargs(arch.shipped_config("unet")))
        te = CLIPTextModel(CLIPTextConfig(**arch.shipped_config("text_encoder")))
    return unet, None, te


def step_time(steps: int):
    import torch

    from library.models.tiny import build_tiny_components

    rows = []
    for name, (dim, alpha, args) in CONFIGS.items():
        unet, vae, te = build_tiny_components(0)
        unet.requires_grad_(False)
        te.requires_grad_(False)
        net = build(unet, vae, te, dim, alpha, args, "full")
        net.apply_to(te, unet, True, True)
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49406, (4, 77), generator=g)
        x = torch.randn(4, 4, 32, 32, generator=g)
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            hidden = te(input_ids=ids).last_hidden_state
            loss = unet(x, 500, encoder_hidden_states=hidden).sample.square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
        rows.append((name, sum(times) / len(times)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from library.models.tiny import build_tiny_components

    print(f"{'model':<6} {'preset':<9} {'network':<11} {'modules':>7} {'params':>11} {'fp16 MiB':>9}")
    for row in sizes(lambda: build_tiny_components(0), "tiny") + sizes(sd15_models, "SD1.5"):
        print(f"{row[0]:<6} {row[1]:<9} {row[2]:<11} {row[3]:>7} {row[4]:>11,} {row[5]:>9.2f}")
    print(f"\nCPU s/step, tiny model, preset full, batch 4 at 32x32 latents ({args.steps} steps):")
    rows = step_time(args.steps)
    base = rows[0][1]
    for name, seconds in rows:
        print(f"  {name:<11} {seconds:.3f} s/step  ({seconds / base:.2f} x LoRA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

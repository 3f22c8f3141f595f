#!/usr/bin/env python
"""Generate with a trained ControlNet, with or without the stage-2 UNet LoRA (the inference step of the two-stage radar recipe).

    python inference_controlnet.py --controlnet_path output/controlnet/controlnet --prompt_file prompts.txt \
        --output_dir results_cn --config config.yaml --lora_dir "" --steps 40 --cfg 4.0 --controlnet_scale 1.2
    python inference_controlnet.py ... --lora_dir output/controlnet_lora/lora --lora_scale 0.7

Prompt file: one prompt per line with radar targets and/or a conditioning image and kohya's options,
`a radar range-doppler map --targets 85.2,-12.5 120,3,0.8 --cond cond.png --n negative --d 42`, or a
.jsonl of {"text", "targets": [{"range", "velocity", "amplitude"}], "conditioning_image", "seed"}.
Writes <n>_<seed>.png, its condition and an overlay marking the targets, and results.jsonl.
--heatmap_sigma, --range_max, --vel_max, the base model and the size default to what the ControlNet
was trained with (saved beside it); a different value gets a warning.
"""
from __future__ import annotations

import argparse
import json
import sys

from library import args as A
from library.errors import UserError, run_cli
from library.prompts import SAMPLERS


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with a ControlNet (and optionally a UNet LoRA).")
    p.add_argument("--controlnet_path", required=True, help="controlnet/ folder, a training output folder, or .safetensors")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="base model (default: the one it was trained on)")
    p.add_argument("--prompt_file", default=None, help=".txt (one prompt per line, --targets/--cond options) or .jsonl")
    p.add_argument("--prompt", default=None, help="a single prompt line instead of --prompt_file")
    p.add_argument("--output_dir", required=True, help="folder for the images")
    p.add_argument("--config", default=None, help="the training config (.yaml/.toml): heatmap_sigma, range_max, vel_max")
    p.add_argument("--lora_dir", default="", help='LoRA folder (lora/) or file; "" for none')
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA weight (0.6-0.8 keeps positions best)")
    p.add_argument("--steps", type=A.positive_int, default=40, help="sampling steps")
    p.add_argument("--cfg", type=A.non_negative_float, default=4.0, help="CFG scale")
    p.add_argument("--controlnet_scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--heatmap_sigma", type=A.positive_float, default=None, help="must match training")
    p.add_argument("--range_max", type=A.positive_float, default=None, help="radar axes (default: training's)")
    p.add_argument("--vel_max", type=A.positive_float, default=None, help="radar axes (default: training's)")
    p.add_argument("--conditioning_image", default=None, help="one conditioning image for every prompt")
    p.add_argument("--width", type=A.positive_int, default=None, help="default: the training resolution")
    p.add_argument("--height", type=A.positive_int, default=None, help="default: the training resolution")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; the next ones count up")
    p.add_argument("--images_per_prompt", type=A.positive_int, default=1)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    import torch

    from library.controlnet import inference as inf
    from library.controlnet.conditioning import RadarConditioning
    from library.controlnet.conditioning import load_aligned as load_condition
    from library.controlnet.model import load_controlnet, read_record, resolve_controlnet_path
    from library.controlnet.radar import RadarAxes
    from library.data.buckets import Placement
    from library.fileio import check_writable_dir
    from library.logs import warn_once
    from library.models.loading import load_sd_model

    if bool(args.prompt) == bool(args.prompt_file):
        raise UserError("give exactly one of --prompt and --prompt_file.", fix="pass --prompt_file prompts.txt.")
    out_dir = check_writable_dir(args.output_dir, "--output_dir")
    cn_path = resolve_controlnet_path(args.controlnet_path)
    record = read_record(cn_path)
    config = {}
    if args.config:
        import train_controlnet
        from library.controlnet.config import flag_values, load_raw

        config = flag_values(train_controlnet.setup_parser(), load_raw(args.config), args.config)
    sigma = inf.resolve(args.heatmap_sigma, record, config, "heatmap_sigma", 8.0, warn_once)
    axes = RadarAxes(inf.resolve(args.range_max, record, config, "range_max", 200.0, warn_once),
                     inf.resolve(args.vel_max, record, config, "vel_max", 40.0, warn_once))
    base = args.pretrained_model_name_or_path or config.get("pretrained_model_name_or_path") or \
        record.get("pretrained_model_name_or_path")
    if not base:
        raise UserError("no base model given, and none is recorded with the ControlNet.",
                        fix="pass --pretrained_model_name_or_path.")
    size = record.get("resolution") or [512, 512]
    width, height = args.width or size[0], args.height or size[1]
    if args.prompt_file:
        jobs = inf.read_jobs(args.prompt_file, args.seed, args.images_per_prompt)
    else:
        from pathlib import Path

        jobs = inf.jobs_from_text(args.prompt, False, Path.cwd(), "--prompt", args.seed, args.images_per_prompt)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sd_model(base, device=device)
    controlnet = load_controlnet(cn_path, model.unet, model.vae).to(device)
    pipe = inf.build_pipeline(model, controlnet, args.sampler)
    if args.lora_dir:
        used = inf.load_lora(pipe, args.lora_dir)
        inf.set_lora_scale(pipe, args.lora_scale)
        print(f"LoRA {used} at scale {args.lora_scale:g}")
    radar = RadarConditioning(axes, sigma, warn_once)
    full = Placement((width, height), (width, height), 0.0)
    results = []
    for i, job in enumerate(jobs):
        image_path = job.condition_image or args.conditioning_image
        if image_path:
            cond = load_condition(image_path, (width, height), full)
        elif job.targets:
            cond = radar.from_targets(job.targets, width, height)
        else:
            raise UserError(f"prompt {i + 1} ({job.prompt!r}) has neither --targets nor a conditioning image.",
                            fix="add --targets range,velocity to the line, or pass --conditioning_image.")
        image = inf.generate(pipe, [job.prompt], [cond], [job.seed], job.steps or args.steps,
                             args.cfg if job.cfg is None else job.cfg, args.controlnet_scale, [job.negative])[0]
        points = [axes.to_pixel(t.range, t.velocity, width, height) for t in job.targets if axes.inside(t.range, t.velocity)]
        stem = f"{i:03d}_{job.seed}"
        files = {"image": inf.save_png(image, out_dir / f"{stem}.png"),
                 "condition": inf.save_png(cond, out_dir / f"{stem}_condition.png"),
                 "overlay": inf.save_png(inf.overlay(image, points, sigma), out_dir / f"{stem}_overlay.png")}
        results.append({"prompt": job.prompt, "seed": job.seed, "points": points,
                        "targets": [vars(t) for t in job.targets], **{k: str(v) for k, v in files.items()}})
    from library.fileio import write_text_atomic

    write_text_atomic(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    print(f"wrote {len(results)} images (with conditions and overlays) to {out_dir}; heatmap sigma {sigma:g}, "
          f"controlnet scale {args.controlnet_scale:g}" + (f", LoRA scale {args.lora_scale:g}" if args.lora_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

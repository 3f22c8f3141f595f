#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x and LoRAs (command-line compatible with kohya's gen_img.py).

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry --d 42" \
        --network_module networks.lora --network_weights a.safetensors b.safetensors --network_mul 0.8 0.5 \
        --sampler euler_a --steps 30 --scale 7.5 --images_per_prompt 4 --batch_size 2

Prompts (--prompt, or --from_file with one per line) take kohya's inline options
--n (negative prompt) --w --h (size) --s (steps) --l (CFG scale) --d (seed) --t (strength) --am (LoRA
multipliers), in any case, and
A1111 weights: "a (red:1.3) [cube]" (--max_embeddings_multiples 3 for prompts up to 225 tokens).

img2img, inpainting, hires fix and textual inversion, as kohya's gen_img.py (diffusers' pipelines):

    python gen_img.py ... --image_path start.png --strength 0.6 [--mask_path mask.png]
    python gen_img.py ... --highres_fix_scale 0.5 --highres_fix_steps 20
    python gen_img.py ... --textual_inversion_embeddings mystyle.pt --prompt "a cat, mystyle"

With a ControlNet (train_controlnet.py's output, or any SD1.x ControlNet):

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a room" \
        --controlnet output/controlnet --control_image edges.png --control_scale 0.8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library import args as A
from library.errors import UserError, run_cli
from library.prompts import SAMPLERS


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Text-to-image with Stable Diffusion 1.x and LoRAs.")
    A.add_config_arguments(parser)
    m = parser.add_argument_group("model")
    m.add_argument("--ckpt", type=str, default=None,
                   help="model: single-file .safetensors/.ckpt (original SD layout) or diffusers folder")
    m.add_argument("--vae", type=str, default=None, help="replace the model's VAE (.safetensors or diffusers folder)")
    m.add_argument("--v2", action="store_true", help="the model is SD2.x (detected from the weights when left out)")
    m.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD2.x 768-v models)")
    m.add_argument("--clip_skip", type=A.positive_int, default=None,
                   help="use the n-th text-encoder layer from the end (2 = penultimate)")
    m.add_argument("--fp16", action="store_true", help="fp16 on a CUDA GPU (the CPU always uses fp32)")
    m.add_argument("--bf16", action="store_true", help="bf16 on a CUDA GPU (the CPU always uses fp32)")
    m.add_argument("--xformers", action="store_true", help="accepted for compatibility; PyTorch SDPA is used")
    m.add_argument("--sdpa", action="store_true", help="accepted for compatibility; PyTorch SDPA is used")

    n = parser.add_argument_group("networks")
    n.add_argument("--network_module", type=str, nargs="*", default=None,
                   help="module of each network (default networks.lora; one name applies to all)")
    n.add_argument("--network_weights", type=str, nargs="*", default=None, help="LoRA files to apply")
    n.add_argument("--network_mul", type=float, nargs="*", default=None,
                   help="one multiplier per LoRA file (default 1 each)")

    c = parser.add_argument_group("controlnet")
    c.add_argument("--controlnet", "--control_net_models", type=str, default=None,
                   help="a ControlNet: the controlnet/ folder train_controlnet.py wrote, a training output folder, "
                        "or a single .safetensors file")
    c.add_argument("--control_image", "--guide_image_path", type=str, nargs="*", default=None,
                   help="conditioning image(s), resized to each image's size; one for every prompt, or several "
                        "used in turn, one per generated image")
    c.add_argument("--control_scale", "--control_net_weights", type=float, default=1.0,
                   help="strength of the ControlNet (0 = off, 1 = as trained)")

    i = parser.add_argument_group("img2img, inpainting, hires fix, embeddings")
    i.add_argument("--image_path", type=str, default=None,
                   help="img2img: start from this image (or each image of this folder in turn), resized to the size")
    i.add_argument("--mask_path", type=str, default=None,
                   help="inpainting (with --image_path): redraw where this mask (or each of a folder) is white")
    i.add_argument("--strength", type=A.unit_float, default=None,
                   help="how much of the image is redrawn in img2img, inpainting and the hires pass (default 0.8; "
                        "a prompt's --t overrides it)")
    i.add_argument("--highres_fix_scale", type=A.positive_float, default=None,
                   help="hires fix: draw at this share of the size first (e.g. 0.5), enlarge, then redraw with img2img")
    i.add_argument("--highres_fix_steps", type=A.positive_int, default=28, help="steps of the hires fix's first pass")
    i.add_argument("--highres_fix_strength", type=A.unit_float, default=None,
                   help="strength of the first pass when it starts from --image_path (default: --strength)")
    i.add_argument("--textual_inversion_embeddings", type=str, nargs="*", default=None,
                   help="textual-inversion files (A1111 or kohya format); write the file name (without extension) "
                        "in a prompt to use one")

    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", type=str, default=None,
                   help="the prompt, with optional inline --n --w --h --s --l --d --t (strength) --am (LoRA multipliers)")
    g.add_argument("--from_file", type=str, default=None, help="text file of prompts, one per line")
    g.add_argument("--outdir", type=str, default=None, help="folder for the images")
    g.add_argument("--images_per_prompt", type=A.positive_int, default=1, help="images per prompt")
    g.add_argument("--batch_size", type=A.positive_int, default=1, help="images per pipeline call")
    g.add_argument("--W", type=A.positive_int, default=512, help="width (prompt option --w overrides)")
    g.add_argument("--H", type=A.positive_int, default=512, help="height (prompt option --h overrides)")
    g.add_argument("--steps", type=A.positive_int, default=50, help="sampling steps (prompt option --s overrides)")
    g.add_argument("--scale", type=A.non_negative_float, default=7.5,
                   help="CFG scale (prompt option --l overrides)")
    g.add_argument("--sampler", type=str, default="ddim", choices=sorted(SAMPLERS), help="sampler")
    g.add_argument("--max_embeddings_multiples", type=A.positive_int, default=None,
                   help="prompts up to 75 x this many tokens (kohya's default 1: 75 tokens; 3 for 225)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; the next ones count up (prompt option --d overrides)")
    return parser


def read_prompts(args):
    from library.prompts import parse_prompt_line, read_prompt_file

    defaults = dict(steps=args.steps, scale=args.scale)
    if bool(args.prompt) == bool(args.from_file):
        raise UserError("give exactly one of --prompt and --from_file.",
                        fix='pass --prompt "a photo of a cat" or --from_file prompts.txt.')
    if args.from_file:
        return read_prompt_file(args.from_file, (args.W, args.H), flag="--from_file", **defaults)
    return [parse_prompt_line(args.prompt, (args.W, args.H), **defaults)]


def network_list(args):
    """(module names, files, multipliers), one each per --network_weights file."""
    from library.lora_tools.cli import ratios_for
    from library.models.checkpoint_io import check_exists

    files = args.network_weights or []
    if not files:
        if args.network_mul or args.network_module:
            raise UserError("--network_module / --network_mul were given without --network_weights.",
                            fix="add --network_weights with the LoRA file(s).")
        return [], [], []
    muls = ratios_for(files, args.network_mul, "--network_weights", "--network_mul")
    for path in files:  # before the model is loaded
        check_exists(path, "LoRA file", flag="--network_weights")
    modules = args.network_module or ["networks.lora"]
    if len(modules) == 1:
        modules = modules * len(files)
    if len(modules) != len(files):
        raise UserError(f"--network_module has {len(modules)} names for {len(files)} --network_weights files.",
                        fix="give one --network_module, or one per file.")
    return modules, files, muls


def control_images(args) -> list[str]:
    """The conditioning images, checked before the model loads."""
    from library.models.checkpoint_io import check_exists

    if not args.controlnet:
        if args.control_image:
            raise UserError("--control_image was given without --controlnet.",
                            fix="add --controlnet with the ControlNet folder or file, or drop --control_image.")
        return []
    if not args.control_image:
        raise UserError("--controlnet needs a conditioning image.",
                        fix="pass --control_image with the image the ControlNet should follow (edges, pose, heatmap...).")
    check_exists(args.controlnet, "ControlNet", flag="--controlnet")
    for path in args.control_image:
        check_exists(path, "conditioning image", flag="--control_image")
    return list(args.control_image)


def init_images(args):
    """--image_path / --mask_path, checked before the model loads (None for text-to-image)."""
    from library import generation as gen

    if args.mask_path and not args.image_path:
        raise UserError("--mask_path needs --image_path, the image to inpaint.", fix="add --image_path IMAGE.")
    if args.image_path and args.controlnet:
        raise UserError("--image_path (img2img/inpainting) and --controlnet do not work together yet.",
                        fix="use one of them.")
    if args.highres_fix_scale is not None and args.controlnet:
        raise UserError("--highres_fix_scale and --controlnet do not work together yet.", fix="use one of them.")
    if not args.image_path:
        return None
    return gen.InitImages(gen.image_files(args.image_path, "--image_path"),
                          gen.image_files(args.mask_path, "--mask_path") if args.mask_path else [])


def precision(args):
    import torch

    from library.logs import warn_once

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.fp16 or args.bf16:
        warn_once("no CUDA GPU: generating in fp32 on the CPU (--fp16/--bf16 apply on a GPU).")
    return torch.device("cpu"), torch.float32


def set_multipliers(networks, line_muls, run_muls) -> None:
    """A prompt's --am multipliers (the last one repeats, as kohya), else the run's --network_mul."""
    if not networks:
        return
    muls = list(line_muls or run_muls)
    muls += [muls[-1]] * (len(networks) - len(muls))
    for applied, mul in zip(networks, muls):
        applied.network.set_multiplier(mul)
        applied.multiplier = mul


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if not args.ckpt:
        raise UserError("no model given.", fix="pass --ckpt with a .safetensors checkpoint or a diffusers folder.")
    if not args.outdir:
        raise UserError("no output folder given.", fix="pass --outdir, the folder for the images.")
    prompts = read_prompts(args)
    modules, files, muls = network_list(args)
    controls = control_images(args)
    init = init_images(args)

    from tqdm.auto import tqdm

    from library import generation as gen
    from library.fileio import check_writable_dir
    from library.models.loading import load_sd_model

    out_dir = check_writable_dir(args.outdir, "--outdir")
    device, dtype = precision(args)
    model = load_sd_model(args.ckpt, vae_path=args.vae, v2=args.v2, dtype=dtype, device=device,
                          v_parameterization=args.v_parameterization or None)
    networks = gen.apply_networks(model, modules, files, muls, device, dtype)
    control = None
    if controls:
        from library.controlnet.model import load_controlnet

        controlnet = load_controlnet(args.controlnet, model.unet, model.vae, dtype=dtype).to(device)
        control = gen.Control(Path(args.controlnet), controls, args.control_scale, controlnet)
    pipe = gen.build_pipeline(model, args.sampler, control)
    if args.textual_inversion_embeddings:
        tokens = gen.load_embeddings(pipe, args.textual_inversion_embeddings)
        print(f"textual inversion: {', '.join(tokens)}")
    pipes = {"txt2img": pipe}
    if init is not None or args.highres_fix_scale is not None:  # diffusers' pipelines over the same modules
        pipes.update({kind: gen.pipeline_for(pipe, kind) for kind in ("img2img", "inpaint")})
    strength = 0.8 if args.strength is None else args.strength  # kohya's default
    jobs, seed = gen.plan_jobs(prompts, args.images_per_prompt, args.seed)
    print(f"{len(jobs)} images, seed {seed}, {args.sampler}, {device.type} {str(dtype).removeprefix('torch.')}")
    stamp = gen.timestamp()
    with tqdm(total=len(jobs), desc="images", unit="image") as bar:
        for batch in gen.batches(jobs, args.batch_size):
            common = dict(clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples or 1)
            set_multipliers(networks, batch[0].prompt.network_muls, muls)
            if args.highres_fix_scale is not None:
                images = gen.run_highres(pipes, batch, args.highres_fix_scale, args.highres_fix_steps, strength,
                                         args.highres_fix_strength, init, **common)
            elif init is not None:
                init_batch, masks = init.batch_images(batch)
                images = gen.run_batch(pipes["inpaint" if masks else "img2img"], batch, init_images=init_batch,
                                       masks=masks, strength=strength, **common)
            else:
                images = gen.run_batch(pipe, batch, control=control, **common)
            for job, image in zip(batch, images):
                text = gen.infotext(job, args.sampler, model.model_name, networks, args.clip_skip, control)
                gen.save_png(image, out_dir, stamp, job, text)
                bar.update(1)
    print(f"wrote {len(jobs)} images to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

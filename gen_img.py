#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x and LoRAs (command-line compatible with kohya's gen_img.py).

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry --d 42" \
        --network_module networks.lora --network_weights a.safetensors b.safetensors --network_mul 0.8 0.5 \
        --sampler euler_a --steps 30 --scale 7.5 --images_per_prompt 4 --batch_size 2

Prompts (--prompt, or --from_file with one per line) take kohya's inline options
--n (negative prompt) --w --h (size) --s (steps) --l (CFG scale) --d (seed), in any case, and
A1111 weights: "a (red:1.3) [cube]" (--max_embeddings_multiples 3 for prompts up to 225 tokens).

With a ControlNet (train_controlnet.py's output, or any SD1.x ControlNet):

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a room" \
        --controlnet output/controlnet --control_image edges.png --control_scale 0.8

img2img, inpainting (white in the mask = repaint), the highres fix and textual inversion, as kohya:

    python gen_img.py ... --image_path photo.png --strength 0.6 [--mask_path mask.png]
    python gen_img.py ... --W 1024 --H 1024 --highres_fix_scale 0.5 --highres_fix_steps 20 --strength 0.5
    python gen_img.py ... --textual_inversion_embeddings easynegative.safetensors --prompt "a cat --n easynegative"
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

    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", type=str, default=None, help="the prompt, with optional inline --n --w --h --s --l --d")
    g.add_argument("--from_file", type=str, default=None, help="text file of prompts, one per line")
    g.add_argument("--outdir", type=str, default=None, help="folder for the images")
    g.add_argument("--images_per_prompt", type=A.positive_int, default=1, help="images per prompt")
    g.add_argument("--batch_size", type=A.positive_int, default=1, help="images per pipeline call")
    g.add_argument("--W", type=A.positive_int, default=None,
                   help="width: 512, or --image_path's width (prompt option --w overrides)")
    g.add_argument("--H", type=A.positive_int, default=None,
                   help="height: 512, or --image_path's height (prompt option --h overrides)")
    g.add_argument("--steps", type=A.positive_int, default=50, help="sampling steps (prompt option --s overrides)")
    g.add_argument("--scale", type=A.non_negative_float, default=7.5,
                   help="CFG scale (prompt option --l overrides)")
    g.add_argument("--sampler", type=str, default="ddim", choices=sorted(SAMPLERS), help="sampler")
    g.add_argument("--max_embeddings_multiples", type=A.positive_int, default=None,
                   help="prompts up to 75 x this many tokens (kohya's default 1: 75 tokens; 3 for 225)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; the next ones count up (prompt option --d overrides)")
    g.add_argument("--textual_inversion_embeddings", type=str, nargs="*", default=None,
                   help="textual-inversion files (A1111 .pt/.safetensors, kohya, diffusers); write each one's "
                        "file name in the prompt to use it")

    i = parser.add_argument_group("img2img and inpainting")
    i.add_argument("--image_path", type=str, nargs="*", default=None,
                   help="start from these image(s) or folders of images (img2img; one per generated image, in turn)")
    i.add_argument("--mask_path", type=str, nargs="*", default=None,
                   help="inpainting masks (files or folders) for --image_path: white is repainted, black kept")
    i.add_argument("--strength", type=A.unit_float, default=None,
                   help="how much of the start image is repainted, 0-1 (kohya's default 0.8; prompt option --t)")

    h = parser.add_argument_group("highres fix")
    h.add_argument("--highres_fix_scale", type=A.unit_float, default=None,
                   help="first pass at this fraction of --W/--H (e.g. 0.5), then upscaled and refined by img2img")
    h.add_argument("--highres_fix_steps", type=A.positive_int, default=28, help="steps of the first pass")
    h.add_argument("--highres_fix_strength", type=A.unit_float, default=None,
                   help="strength of the first pass when it is img2img itself (default --strength)")
    h.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first pass's images")
    h.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="upscale the first pass's latents (bicubic) instead of its image (Lanczos)")
    return parser


def read_prompts(args, size: tuple[int, int]):
    from library.prompts import parse_prompt_line, read_prompt_file

    defaults = dict(steps=args.steps, scale=args.scale)
    if bool(args.prompt) == bool(args.from_file):
        raise UserError("give exactly one of --prompt and --from_file.",
                        fix='pass --prompt "a photo of a cat" or --from_file prompts.txt.')
    if args.from_file:
        return read_prompt_file(args.from_file, size, flag="--from_file", **defaults)
    return [parse_prompt_line(args.prompt, size, **defaults)]


def init_images(args):
    """(InitImages or None, the default size): --image_path/--mask_path checked before the model loads.
    Without --W/--H the first start image's size is the default, as kohya does."""
    from library import generation as gen
    from library.data.probe import probe_image
    from library.generation import InitImages

    if not args.image_path:
        if args.mask_path or (args.strength is not None and args.highres_fix_scale is None):
            raise UserError("--mask_path / --strength were given without --image_path (or --highres_fix_scale).",
                            fix="add --image_path with the image(s) to start from.")
        return None, (args.W or 512, args.H or 512)
    sizes = []
    images = [f for path in args.image_path for f in gen.image_files(path, "--image_path")]
    masks = [f for path in args.mask_path or [] for f in gen.image_files(path, "--mask_path")]
    for flag, paths in (("--image_path", images), ("--mask_path", masks)):
        for path in paths:
            size, why = probe_image(path)
            if size is None:
                raise UserError(f"{flag} {path} cannot be read as an image ({why}).", path=path,
                                fix="pass a PNG, JPEG or WebP file.")
            sizes.append(size)
    width, height = sizes[0]
    init = InitImages(images, masks)
    return init, (args.W or width, args.H or height)


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


def precision(args):
    import torch

    from library.logs import warn_once

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.fp16 or args.bf16:
        warn_once("no CUDA GPU: generating in fp32 on the CPU (--fp16/--bf16 apply on a GPU).")
    return torch.device("cpu"), torch.float32


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    if not args.ckpt:
        raise UserError("no model given.", fix="pass --ckpt with a .safetensors checkpoint or a diffusers folder.")
    if not args.outdir:
        raise UserError("no output folder given.", fix="pass --outdir, the folder for the images.")
    init, size = init_images(args)
    prompts = read_prompts(args, size)
    modules, files, muls = network_list(args)
    controls = control_images(args)
    highres = None
    if args.highres_fix_scale is not None:
        from library.generation import HighresFix

        highres = HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                             args.highres_fix_latents_upscaling, args.highres_fix_save_1st)

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
    for token, vectors in gen.load_embeddings(pipe, args.textual_inversion_embeddings or []):
        print(f"textual inversion: {token} ({vectors} vector{'s' if vectors > 1 else ''})")
    jobs, seed = gen.plan_jobs(prompts, args.images_per_prompt, args.seed)
    mode = "inpainting" if init and init.masks else "img2img" if init else "text-to-image"
    print(f"{len(jobs)} images ({mode}{', highres fix' if highres else ''}), seed {seed}, {args.sampler}, "
          f"{device.type} {str(dtype).removeprefix('torch.')}")
    stamp = gen.timestamp()
    strength = 0.8 if args.strength is None else args.strength  # kohya's default
    with tqdm(total=len(jobs), desc="images", unit="image") as bar:
        for batch in gen.batches(jobs, args.batch_size):
            gen.set_multipliers(batch[0], networks)
            final, first = gen.generate(pipe, batch, args.clip_skip, control, args.max_embeddings_multiples or 1,
                                        init, highres, strength)
            for k, job in enumerate(batch):
                text = gen.infotext(job, args.sampler, model.model_name, networks, args.clip_skip, control,
                                    init, highres, strength)
                if highres and highres.save_first and first is not None:
                    gen.save_png(first[k], out_dir, stamp, job, text, prefix="0")
                gen.save_png(final[k], out_dir, stamp, job, text, prefix="1" if highres else "")
                bar.update(1)
    print(f"wrote {len(jobs)} images to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

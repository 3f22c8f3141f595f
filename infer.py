#!/usr/bin/env python
"""Inpaint an image with a ControlNet trained by `train_controlnet.py --conditioning_type inpaint`.

    python infer.py --checkpoint_path output/inpaint/controlnet --input_image test.jpg --input_mask mask.png \
        --prompt "a dog" --output result.png

The mask is white where the picture is repainted. Image and mask are resized to a size near the
training resolution (the image's aspect ratio kept), the mask grown by --mask_dilation pixels (default:
the training value), and the result pasted back into the input inside that mask only: outside it the
output is the input image, pixel for pixel, at its own size. Writes the result, <name>_raw.png (the
whole generated image) and <name>_mask.png (the pixels that were replaced).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library import args as A
from library.errors import UserError, run_cli
from library.prompts import SAMPLERS


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Inpaint an image inside a mask with an inpainting ControlNet.")
    p.add_argument("--checkpoint_path", "--controlnet_path", dest="checkpoint_path", required=True,
                   help="the ControlNet: controlnet/ folder, a training output folder, .safetensors or .pth")
    p.add_argument("--input_image", required=True, help="the image to repaint")
    p.add_argument("--input_mask", required=True, help="white where the image is repainted (any size; stretched)")
    p.add_argument("--prompt", default="",
                   help="what to paint in the hole, e.g. 'a dog' (training captions: 'a <category>')")
    p.add_argument("--negative_prompt", default="", help="negative prompt")
    p.add_argument("--output", default=None, help="result image (default: <input name>_inpainted.png here)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base model (default: the one the ControlNet was trained on)")
    p.add_argument("--mask_dilation", type=A.non_negative_int, default=None,
                   help="grow the mask by this many pixels of the generated image (default: the training value)")
    p.add_argument("--steps", type=A.positive_int, default=30, help="sampling steps")
    p.add_argument("--cfg", type=A.non_negative_float, default=7.5, help="CFG scale")
    p.add_argument("--controlnet_scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--width", type=A.positive_int, default=None, help="generation width (default: from the input)")
    p.add_argument("--height", type=A.positive_int, default=None, help="generation height (default: from the input)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--lora_dir", default="", help='a UNet LoRA (folder or file) to load; "" for none')
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    import numpy as np
    import torch

    from library.controlnet import inference as inf
    from library.controlnet import inpaint
    from library.controlnet.model import load_controlnet, read_record, resolve_controlnet_path
    from library.data.probe import load_rgb
    from library.logs import warn_once
    from library.models.loading import load_sd_model

    for flag in ("input_image", "input_mask"):
        if not Path(getattr(args, flag)).is_file():
            raise UserError(f"the --{flag} does not exist.", path=getattr(args, flag),
                            fix=f"pass an image file as --{flag}.")
    cn_path = resolve_controlnet_path(args.checkpoint_path)
    record = read_record(cn_path)
    if record.get("conditioning_type") not in (None, "inpaint"):
        warn_once(f"this ControlNet was trained on {record['conditioning_type']!r} conditions, not for inpainting.")
    base = args.pretrained_model_name_or_path or record.get("pretrained_model_name_or_path")
    if not base:
        raise UserError("no base model given, and none is recorded with the ControlNet.",
                        fix="pass --pretrained_model_name_or_path.")
    output = Path(args.output or f"{Path(args.input_image).stem}_inpainted.png")
    try:
        image = np.asarray(load_rgb(args.input_image))
    except OSError as err:
        raise UserError(f"cannot read the --input_image ({err}).", path=args.input_image,
                        fix="pass a PNG or JPEG image.") from None
    mask = inpaint.load_mask(args.input_mask, (image.shape[1], image.shape[0]), warn_once)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sd_model(base, device=device)
    controlnet = load_controlnet(cn_path, model.unet, model.vae).to(device)
    pipe = inf.build_pipeline(model, controlnet, args.sampler)
    if args.lora_dir:
        inf.load_lora(pipe, args.lora_dir)
        inf.set_lora_scale(pipe, args.lora_scale)
    multiple = inpaint.size_multiple(model.vae, model.unet)
    auto = inpaint.generation_size(image.shape[1], image.shape[0], record.get("resolution") or (512, 512), multiple)
    size = (args.width or auto[0], args.height or auto[1])
    if size[0] % multiple or size[1] % multiple:
        raise UserError(f"--width/--height must be multiples of {multiple} for this model (got {size[0]} x {size[1]}).",
                        fix=f"pass multiples of {multiple}, or leave them out.")
    dilation = args.mask_dilation if args.mask_dilation is not None else int(record.get("mask_dilation", 4))
    out = inpaint.inpaint(pipe, image, mask, args.prompt, args.seed, size, dilation, args.steps, args.cfg,
                          args.controlnet_scale, args.negative_prompt)
    inf.save_png(out["result"], output)
    inf.save_png(out["generated"], output.with_name(f"{output.stem}_raw.png"))
    inf.save_png(out["paste"].astype(np.uint8) * 255, output.with_name(f"{output.stem}_mask.png"))
    print(f"wrote {output} ({image.shape[1]} x {image.shape[0]}; generated at {size[0]} x {size[1]}, mask grown by "
          f"{dilation} px, {int(out['paste'].sum())} pixels replaced), {output.stem}_raw.png and "
          f"{output.stem}_mask.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

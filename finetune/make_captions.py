#!/usr/bin/env python
"""Caption a folder of images with a local vision-language model (kohya's finetune/make_captions.py).

    python finetune/make_captions.py data/img --caption_weights models/blip-image-captioning-large \
        --batch_size 4 --caption_extension .caption

--caption_weights is a transformers model folder (BLIP, GIT or BLIP-2: the model type is read from
its config.json). Unlike kohya, the original BLIP .pth is not read (transformers has the model code;
we do not ship a second copy). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python finetune/...`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Caption images with a local BLIP/GIT model (kohya-compatible).")
    A.add_config_arguments(p)
    p.add_argument("train_data_dir", type=str, help="folder of images to caption")
    p.add_argument("--caption_weights", type=str, required=True,
                   help="folder of a transformers captioning model (BLIP, GIT, BLIP-2)")
    p.add_argument("--caption_extension", type=str, default=".caption", help="extension of the caption files written")
    p.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    p.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--batch_size", type=A.positive_int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="accepted; images load in the main process")
    p.add_argument("--num_beams", type=A.positive_int, default=1, help="beams for --beam_search")
    p.add_argument("--top_p", type=A.unit_float, default=0.9, help="top_p of nucleus sampling")
    p.add_argument("--max_length", type=A.positive_int, default=75, help="longest caption, in tokens")
    p.add_argument("--min_length", type=int, default=5, help="shortest caption, in tokens")
    p.add_argument("--seed", type=int, default=42, help="seed for the sampling")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    return p


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    from tqdm import tqdm

    import torch

    from library.dataprep.captioner import Captioner, GenerationOptions, caption_images
    from library.dataprep.images import find_images

    if args.min_length > args.max_length:
        raise UserError(f"--min_length {args.min_length} is above --max_length {args.max_length}.",
                        fix="lower --min_length or raise --max_length.")
    torch.manual_seed(args.seed)
    paths = find_images(args.train_data_dir, args.recursive)
    captioner = Captioner(args.caption_weights)
    print(f"captioning {len(paths)} images with {captioner.folder}", flush=True)
    options = GenerationOptions(args.beam_search, args.num_beams, args.top_p, args.max_length, args.min_length)

    bar = tqdm(total=len(paths), desc="captioning", smoothing=0)  # the GUI's progress bar reads it

    def progress(done, total, path, text):
        bar.update(done - bar.n)
        if args.debug:
            bar.write(f"{path}: {text}")

    written, failed = caption_images(captioner, paths, options, args.caption_extention or args.caption_extension,
                                     args.batch_size, progress)
    bar.close()
    print(f"wrote {len(written)} caption files", flush=True)
    if failed:
        lines = "; ".join(f"{p} ({why})" for p, why in failed)
        raise UserError(f"{len(failed)} image(s) were not captioned and got no caption file: {lines}.",
                        fix="replace or remove these files and run the captioner again.")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

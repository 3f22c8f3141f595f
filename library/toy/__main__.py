"""`python -m library.toy build --output_dir DIR`: the toy-world base model (see library/toy/__init__.py).

    build    pretrain the base (or reuse the cache) and write DIR/toy-sd15/, DIR/toy-sd15.safetensors
             and DIR/toy_world.json
    dataset  write the new concept ("a sks circle" = green circles) as a kohya dataset folder
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.toy", description="The toy world: a tiny SD1.5-"
                                     "structured base model pretrained offline on coloured shapes.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the base model (cached in .cache/toy/) and copy it to --output_dir")
    b.add_argument("--output_dir", default=None, help="folder to write toy-sd15/ and toy-sd15.safetensors into "
                                                      "(default: only the cache)")
    b.add_argument("--no_cache", action="store_true", help="build from scratch and leave the cache alone")
    d = sub.add_parser("dataset", help="write the LoRA dataset of the new concept (kohya folder layout)")
    d.add_argument("--output_dir", required=True, help="the --train_data_dir to write into")
    d.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    d.add_argument("--repeats", type=int, default=10, help="repeats in the folder name (default 10)")
    args = parser.parse_args(argv)

    from library.toy import build

    build.default_threads()
    if args.command == "build":
        if args.no_cache and not args.output_dir:
            parser.error("--no_cache needs --output_dir")
        paths = build.build(args.output_dir, use_cache=not args.no_cache)
        print(paths.diffusers_dir)
        print(paths.single_file)
        print(paths.info_file)
    else:
        from library.toy.world import write_lora_dataset

        print(write_lora_dataset(args.output_dir, count=args.count, repeats=args.repeats))
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    raise SystemExit(run_cli(main))

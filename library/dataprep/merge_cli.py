"""The shared command line of merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py: the
two kohya scripts differ only in the metadata field they fill and the caption extension they read."""
from __future__ import annotations

import argparse
from pathlib import Path

from library import args as A
from library.errors import UserError


def setup_parser(field: str, default_extension: str) -> argparse.ArgumentParser:
    what = "captions" if field == "caption" else "tags"
    p = argparse.ArgumentParser(description=f"Merge {what} files into kohya's fine-tuning metadata JSON (--in_json).")
    A.add_config_arguments(p)
    p.add_argument("train_data_dir", type=str, help="folder of the images")
    p.add_argument("out_json", type=str, help="metadata JSON to write")
    p.add_argument("--in_json", type=str, default=None,
                   help="metadata JSON to add to (default: out_json when it exists, else a new file)")
    p.add_argument("--caption_extension", type=str, default=default_extension, help=f"extension of the {what} files")
    if field == "caption":
        p.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    p.add_argument("--full_path", action="store_true", help="key images by full path (several folders in one file)")
    p.add_argument("--recursive", action="store_true", help="also read sub-folders (needs --full_path)")
    return p


def run(argv, field: str, default_extension: str) -> int:
    from library.dataprep.images import find_images
    from library.dataprep.metadata import load_metadata, merge_files, write_metadata

    args = A.parse_args(setup_parser(field, default_extension), argv)
    if args.recursive and not args.full_path:
        raise UserError("--recursive needs --full_path: image names may repeat across sub-folders.",
                        fix="add --full_path (keys become full paths), or leave out --recursive.")
    extension = getattr(args, "caption_extention", None) or args.caption_extension
    images = find_images(args.train_data_dir, args.recursive)
    source = args.in_json or (args.out_json if Path(args.out_json).is_file() else None)
    metadata = load_metadata(source) if source else {}
    print(f"{len(images)} images; " + (f"adding to {source}" if source else "new metadata"), flush=True)
    metadata, missing = merge_files(images, field, extension, args.full_path, metadata)
    if args.debug:
        for key, entry in metadata.items():
            print(key, entry.get(field))
    if missing:
        print(f"warning: {len(missing)} image(s) have no {extension} file and were left out: "
              + ", ".join(str(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else ""), flush=True)
    write_metadata(args.out_json, metadata)
    print(f"wrote {args.out_json} ({len(metadata)} entries)", flush=True)
    return 0

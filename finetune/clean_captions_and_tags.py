#!/usr/bin/env python
"""Clean the captions and tags of a fine-tuning metadata JSON (kohya's finetune/clean_captions_and_tags.py).

    python finetune/clean_captions_and_tags.py meta.json meta_clean.json

Tags: underscores become spaces, a DeepDanbooru rating tail is cut, hair/eye/sleeve attributes that
conflict in pictures of several people are dropped, "shirt" is dropped beside "white shirt".
Captions: BLIP's "anime woman", "cartoon character", "person" ... become "girl".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python finetune/...`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import run_cli  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Clean captions and tags in a fine-tuning metadata JSON.")
    A.add_config_arguments(p)
    p.add_argument("in_json", type=str, help="metadata JSON to read")
    p.add_argument("out_json", type=str, help="metadata JSON to write (may be the same file)")
    return p


def main(argv=None):
    from library.dataprep.metadata import clean_metadata, load_metadata, write_metadata

    args = A.parse_args(setup_parser(), argv)
    metadata = load_metadata(args.in_json)
    before = {k: dict(v) for k, v in metadata.items()} if args.debug else None
    for note in clean_metadata(metadata):
        print(f"note: {note}")
    if before is not None:
        for key, entry in metadata.items():
            for field in ("tags", "caption"):
                if before[key].get(field) != entry.get(field):
                    print(f"{key} {field}:\n  FROM: {before[key].get(field)}\n  TO:   {entry.get(field)}")
    write_metadata(args.out_json, metadata)
    print(f"wrote {args.out_json} ({len(metadata)} entries)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Merge the captions files beside each image into kohya's fine-tuning metadata JSON, under "caption"
(kohya's finetune/merge_captions_to_metadata.py, same arguments).

    python finetune/merge_captions_to_metadata.py data/img meta.json [--in_json old.json] [--caption_extension .caption]
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python finetune/...`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.dataprep import merge_cli  # noqa: E402
from library.errors import run_cli  # noqa: E402


def setup_parser():
    return merge_cli.setup_parser("caption", ".caption")


def main(argv=None):
    return merge_cli.run(argv, "caption", ".caption")


if __name__ == "__main__":
    sys.exit(run_cli(main))

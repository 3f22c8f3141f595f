#!/usr/bin/env python
"""Turn a kohya_ss GUI preset (the JSON its LoRA tab saves) into a TOML file for --config_file.

    python tools/kohya_ss_preset.py "my kohya_ss preset.json" my_preset.toml
    python train_network.py --config_file my_preset.toml

What had no equivalent is listed. The GUI does the same with File > Import kohya_ss preset….
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", type=Path, help="the kohya_ss .json preset")
    p.add_argument("out", type=Path, help="the TOML file to write")
    args = p.parse_args(argv)
    from gui.kohya_import import convert

    path, script, notes = convert(args.preset, args.out)
    print(f"wrote {path}: run it with  python {script}.py --config_file {path}")
    for note in notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

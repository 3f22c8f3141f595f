"""Desktop GUI (Tkinter) for the sd-trainers scripts: forms generated from each script's argparse
parser, TOML presets the scripts read with --config_file, runs with live progress, a queue.

Start it with `python -m gui` (or `make gui`).
"""

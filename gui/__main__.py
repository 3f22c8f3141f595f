"""`python -m gui` (or `make gui`): the desktop GUI."""
from __future__ import annotations

import argparse
import os
import sys
import tkinter as tk


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gui", description="Desktop GUI for the sd-trainers scripts.")
    parser.add_argument("--theme", choices=["system", "light", "dark"], default=None)
    parser.add_argument("--scale", type=float, default=None, help="UI scale factor (e.g. 1.5 on HiDPI screens)")
    parser.add_argument("--home", default=None, help="folder for user presets, last session and the queue")
    parser.add_argument("--preset", default=None, help="load this preset file into its script's tab")
    parser.add_argument("--fresh", action="store_true", help="do not restore the last session")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["SDT_GUI_HOME"] = os.path.abspath(args.home)
    from gui.app import App
    from gui.sessions import load_preset_anywhere

    root = tk.Tk(className="sd-trainers")
    app = App(root, theme_mode=args.theme, scale=args.scale, restore=not args.fresh)
    if args.preset:
        load_preset_anywhere(app, args.preset)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

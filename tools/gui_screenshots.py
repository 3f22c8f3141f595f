#!/usr/bin/env python
"""Screenshots of the GUI's screens on a private virtual display, to look at as a user would.

    python tools/gui_screenshots.py --size 1366x768 --out shots/   # then open the PNGs
    python tools/gui_screenshots.py --size 1920x1080 --out shots/ --screens lora lycoris

Starts its own Xvfb (the display number picked by Xvfb, so runs never clash), builds the window
in a fresh GUI home (your presets and session are not touched), sets each screen up and saves
<out>/<screen>-<size>.png. Needs Xvfb (apt-get install xvfb) and Pillow.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start_xvfb(size: str) -> tuple[subprocess.Popen, str]:
    with tempfile.TemporaryFile("w+") as fh:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(fh.fileno()), "-screen", "0", f"{size}x24",
                                 "-nolisten", "tcp"], pass_fds=(fh.fileno(),),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        number, end = "", time.monotonic() + 10
        while time.monotonic() < end and not number.endswith("\n") and proc.poll() is None:
            time.sleep(0.02)
            fh.seek(0)
            number = fh.read()
    if not number.strip():
        proc.kill()
        raise SystemExit("Xvfb did not start (apt-get install xvfb)")
    return proc, f":{number.strip()}"


def pump(root, seconds: float = 0.3):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        root.update()
        time.sleep(0.01)


def grab(root, path: Path):
    from PIL import ImageGrab

    root.update()
    x, y, w, h = root.winfo_rootx(), root.winfo_rooty(), root.winfo_width(), root.winfo_height()
    top = min(y, int(root.geometry().split("+")[2]))      # the menu bar is above the client area
    ImageGrab.grab(bbox=(x, top, x + w, y + h), xdisplay=os.environ["DISPLAY"]).save(path)


def fake_samples(folder: Path):
    """Sample files named as a trainer names them: a circle that gets rounder with the steps."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for step in (0, 50, 100, 150):
        for i, color in enumerate(((40, 170, 60), (200, 60, 60))):
            im = Image.new("RGB", (256, 256), (235, 235, 225))
            r = 40 + step // 3
            ImageDraw.Draw(im).ellipse((128 - r, 128 - r * (1 + (150 - step) / 300), 128 + r, 128 + r), fill=color)
            im.save(folder / f"demo_{step:06d}_{i:02d}_20261208-030000_{i}.png")


def setup_screen(app, name: str):
    """Put the window into the state a screen shows; returns a window to shoot instead of the main one."""
    tab = app.tabs["train_network"]
    app.notebook.select(tab)
    out = Path(os.environ["SDT_GUI_HOME"]) / "demo output"
    if name in ("prompts", "gallery"):
        tab.form.set_values({"output_dir": str(out)})
    if name == "prompts":
        return tab.edit_prompts()
    if name == "gallery":
        fake_samples(out / "sample")
        return app.run_panel.samples.open_gallery()
    if name == "lycoris":
        tab.form.set_values({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=4"],
                             "pretrained_model_name_or_path": "models/base.safetensors",
                             "train_data_dir": "data/images", "output_dir": "output"})
        tab.form.scroll.scroll_to(tab.form.fields["network_module"].widget)
        tab.style_var.set("flags")          # the long form of the command, wrapped
    elif name == "find":
        tab.filter_var.set("lr")
    elif name == "samples":
        tab.form.scroll.scroll_to(tab.form.fields["sample_prompts"].widget)
    elif name in ("tools", "dataset", "queue"):
        app.notebook.select({"tools": app.tools_page, "dataset": app.dataset_tab, "queue": app.queue_tab}[name])


SCREENS = ["lora", "lycoris", "find", "samples", "tools", "dataset", "queue", "prompts", "gallery"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1366x768", help="screen size WxH")
    parser.add_argument("--out", default="test-artifacts/screens", help="folder for the PNGs")
    parser.add_argument("--screens", nargs="*", default=SCREENS, choices=SCREENS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xvfb, display = start_xvfb(args.size)
    os.environ["DISPLAY"] = display
    home = tempfile.mkdtemp(prefix="sdt-gui-shots-")
    os.environ["SDT_GUI_HOME"] = home
    try:
        import tkinter as tk

        from gui.app import App

        for name in args.screens:
            root = tk.Tk()
            app = App(root, theme_mode="light")
            pump(root)
            window = setup_screen(app, name)
            pump(root, 0.5)
            path = out / f"{name}-{args.size}.png"
            grab(window or root, path)
            print(path)
            app.on_close(force=True)
    finally:
        xvfb.terminate()
        xvfb.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

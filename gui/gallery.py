"""A run's sample images by step (the trainers write `<output_dir>/sample/<name>_<step>_<i>_...png`,
or `<name>_e<epoch>_...` for epoch samples): thumbnails in rows, click one to see it full size,
Open folder for the file manager."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tkinter as tk
from pathlib import Path
from tkinter import ttk

from gui.samples import IMAGE_EXTS

# <name>_000012_00_<stamp>_<seed>.png (step 12, prompt 0) or <name>_e000003_01_... (epoch 3)
NAME = re.compile(r"_(e?)(\d{6})_(\d{2})_[^_]*_[^_]*$")
REFRESH_MS = 2000


def sample_key(path: Path) -> tuple[str, int, int] | None:
    """("step"|"epoch", number, prompt index) from a sample's file name; None for other images."""
    m = NAME.search(path.stem)
    if not m:
        return None
    return ("epoch" if m.group(1) else "step", int(m.group(2)), int(m.group(3)))


def grouped(folder: Path) -> list[tuple[str, list[Path]]]:
    """[(heading, images)] oldest first: one row per step (or epoch); unnamed images last."""
    try:
        files = [Path(e.path) for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                 and Path(e.name).suffix.lower() in IMAGE_EXTS]
    except OSError:
        return []
    rows: dict[tuple[str, int], list[tuple[int, Path]]] = {}
    other = []
    for path in files:
        key = sample_key(path)
        if key is None:
            other.append(path)
        else:
            rows.setdefault(key[:2], []).append((key[2], path))
    out = []
    # step 0 (sample_at_first), then steps and epochs in the order they were written
    for (kind, number), items in sorted(rows.items(), key=lambda kv: min(p.stat().st_mtime for _, p in kv[1])):
        out.append((f"{kind} {number}", [p for _, p in sorted(items)]))
    if other:
        out.append(("other images", sorted(other)))
    return out


def open_folder(folder: Path) -> str | None:
    """Show the folder in the desktop's file manager; the reason when that is not possible."""
    command = {"darwin": ["open"], "win32": None}.get(sys.platform, ["xdg-open"])
    try:
        if command is None:
            os.startfile(folder)   # type: ignore[attr-defined]  (Windows)
        else:
            subprocess.Popen([*command, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    except (OSError, AttributeError) as err:
        return f"could not open {folder}: {err}"
    return None


def _thumbnail(path: Path, px: int, master):
    from PIL import Image, ImageTk

    with Image.open(path) as im:
        im = im.convert("RGB")
        factor = px / max(im.size)
        resample = Image.NEAREST if factor >= 2 else Image.LANCZOS   # tiny samples stay crisp
        im = im.resize((max(1, round(im.width * factor)), max(1, round(im.height * factor))), resample)
        return ImageTk.PhotoImage(im, master=master)


class Viewer(tk.Toplevel):
    """One image, as large as the screen allows."""

    def __init__(self, master, path: Path):
        super().__init__(master)
        self.title(path.name)
        self.path = path
        px = int(min(self.winfo_screenwidth(), self.winfo_screenheight()) * 0.75)
        self.photo = _thumbnail(path, px, self)
        ttk.Label(self, image=self.photo).pack(padx=8, pady=8)
        ttk.Label(self, text=str(path), style="Muted.TLabel").pack(padx=8, pady=(0, 8))
        self.bind("<Escape>", lambda e: self.destroy())
        self.bind("<Button-1>", lambda e: self.destroy())


class Gallery(tk.Toplevel):
    def __init__(self, master, folder: Path, title: str = "Sample images", thumb_px: int | None = None):
        super().__init__(master)
        from gui.widgets import ScrollFrame

        # thumbnails grow with the screen: 136 px at 1366 wide, 192 px at 1920
        self.folder = Path(folder)
        self.thumb_px = thumb_px or max(128, min(256, self.winfo_screenwidth() // 10))
        self.title(f"{title}: {folder}")
        top = master.winfo_toplevel()
        w, h = int(top.winfo_width() * 0.8), int(top.winfo_height() * 0.8)
        self.geometry(f"{max(480, w)}x{max(360, h)}+{top.winfo_rootx() + 40}+{top.winfo_rooty() + 40}")
        bar = ttk.Frame(self, padding=(8, 6))
        bar.pack(fill="x")
        self.summary = ttk.Label(bar, text="")
        self.summary.pack(side="left")
        ttk.Button(bar, text="Close", command=self.close).pack(side="right")
        ttk.Button(bar, text="Open folder", command=self.open_folder).pack(side="right", padx=4)
        self.scroll = ScrollFrame(self)
        self.scroll.pack(fill="both", expand=True)
        self.rows: list[tuple[str, list[Path]]] = []
        self.photos: list = []
        self.viewer: Viewer | None = None
        self._after = None
        self.bind("<Escape>", lambda e: self.close())
        self.protocol("WM_DELETE_WINDOW", self.close)
        self.refresh()

    def refresh(self):
        self._after = None
        rows = grouped(self.folder)
        if rows != self.rows:
            self.rows = rows
            self._draw()
        self._after = self.after(REFRESH_MS, self.refresh)   # a running training adds images

    def _draw(self):
        for child in self.scroll.inner.winfo_children():
            child.destroy()
        self.photos.clear()
        count = sum(len(images) for _, images in self.rows)
        self.summary.configure(text=f"{count} image(s) in {len(self.rows)} row(s)" if count else
                               f"no images yet in {self.folder}")
        for r, (heading, images) in enumerate(self.rows):
            ttk.Label(self.scroll.inner, text=heading, style="Heading.TLabel").grid(row=r, column=0, sticky="nw",
                                                                                  padx=8, pady=6)
            for c, path in enumerate(images, start=1):
                try:
                    photo = _thumbnail(path, self.thumb_px, self)
                except (OSError, ValueError):
                    continue     # still being written: the next refresh shows it
                self.photos.append(photo)
                thumb = ttk.Label(self.scroll.inner, image=photo, cursor="hand2")
                thumb.grid(row=r, column=c, padx=3, pady=3, sticky="nw")
                thumb.bind("<Button-1>", lambda e, p=path: self.show(p))

    def show(self, path: Path) -> Viewer:
        if self.viewer is not None and self.viewer.winfo_exists():
            self.viewer.destroy()
        self.viewer = Viewer(self, path)
        return self.viewer

    def open_folder(self):
        problem = open_folder(self.folder)
        self.summary.configure(text=problem or f"opened {self.folder}")

    def close(self):
        if self._after is not None:
            self.after_cancel(self._after)
            self._after = None
        self.destroy()

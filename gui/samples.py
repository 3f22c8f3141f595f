"""The samples pane: the newest images a run writes (a trainer's `<output_dir>/sample`, gen_img's
`--outdir`), shown as they appear."""
from __future__ import annotations

import os
import tkinter as tk
from pathlib import Path
from tkinter import ttk

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
POLL_MS = 1000


def newest_images(folder: Path, since: float = 0.0, limit: int = 5) -> list[Path]:
    """Images in `folder` modified at or after `since`, newest first."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS
                   and not e.name.startswith(".")]
    except OSError:
        return []
    found = [(e.stat().st_mtime, e.path) for e in entries]
    found = [(t, p) for t, p in found if t >= since]
    found.sort(reverse=True)
    return [Path(p) for _, p in found[:limit]]


class SamplesPane(ttk.Frame):
    def __init__(self, master, scale: float = 1.0):
        super().__init__(master, padding=4)
        self.big_px, self.small_px = int(256 * scale), int(72 * scale)
        self.folder: Path | None = None
        self.since = 0.0
        self.shown: list[Path] = []
        self._photos = []          # Tk drops images Python does not reference
        self._after = None
        head = ttk.Frame(self)
        head.pack(fill="x")
        ttk.Label(head, text="Sample images", style="Heading.TLabel").pack(side="left")
        self.gallery_button = ttk.Button(head, text="Gallery…", command=self.open_gallery)
        self.gallery_button.pack(side="right")
        self.folder_source = lambda: self.folder   # the App points this at the run's / tab's folder
        self.gallery = None
        self.hint = "Images a run writes appear here."
        self.caption = ttk.Label(self, text=self.hint,
                                 style="Muted.TLabel", justify="left", wraplength=int(240 * scale))
        self.caption.pack(anchor="w")
        self.bind("<Configure>", self._resized, add="+")
        self._room = (self.big_px, self.big_px)
        self.big = ttk.Label(self, cursor="hand2")
        self.big.pack(anchor="w", pady=(4, 4))
        self.big.bind("<Button-1>", lambda e: self.enlarge())
        self.strip = ttk.Frame(self)
        self.strip.pack(anchor="w")

    def _resized(self, event):
        self.caption.configure(wraplength=max(120, event.width - 12))
        room = (max(48, event.width - 12), max(48, event.height - 56))
        if room != self._room:
            self._room = room
            if self.shown:
                self._show(self.shown)

    def open_gallery(self):
        """Every sample of the run (or of the current tab's output folder), by step."""
        from gui.gallery import Gallery

        folder = self.folder or self.folder_source()
        if folder is None:
            self.caption.configure(text="Set the output folder first: the gallery shows its sample images.")
            return None
        if self.gallery is not None and self.gallery.winfo_exists():
            self.gallery.close()
        self.gallery = Gallery(self, folder)
        return self.gallery

    def enlarge(self):
        from gui.gallery import Viewer

        return Viewer(self, self.shown[0]) if self.shown else None

    def set_hint(self, text: str):
        """What the pane says while it shows no image (depends on the tab in front)."""
        self.hint = text
        if not self.shown:
            self.caption.configure(text=text)

    def watch(self, folder: Path | None, since: float = 0.0):
        """Follow `folder` (None: stop); only images written after `since` count as this run's."""
        self.folder, self.since = (Path(folder) if folder else None), since
        self.shown = []
        self._poll()

    def _poll(self):
        self._cancel()
        if self.folder is None:
            return
        self.refresh()
        self._after = self.after(POLL_MS, self._poll)

    def _cancel(self):
        if self._after is not None:
            try:
                self.after_cancel(self._after)
            except tk.TclError:
                pass
            self._after = None

    def stop(self):
        """Stop following, after one last look (the final sample may have just been written)."""
        if self.folder is not None:
            self.refresh()
        self._cancel()

    def refresh(self):
        if self.folder is None:
            return
        images = newest_images(self.folder, self.since)
        if images == self.shown:
            return
        self.shown = images
        self._show(images)

    def _show(self, images: list[Path]):
        from PIL import Image, ImageTk

        for child in self.strip.winfo_children():
            child.destroy()
        self._photos.clear()
        if not images:
            return
        big = min(self.big_px, *self._room)                     # fit the pane
        if self._room[1] - big < self.small_px + 6:
            images = images[:1]                                  # no room for the older ones
        for i, path in enumerate(images):
            px = big if i == 0 else self.small_px
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    factor = px / max(im.size)
                    # tiny samples are blown up without blur so their pixels stay readable
                    resample = Image.NEAREST if factor >= 2 else Image.LANCZOS
                    im = im.resize((max(1, round(im.width * factor)), max(1, round(im.height * factor))), resample)
                    photo = ImageTk.PhotoImage(im, master=self)
            except (OSError, ValueError):
                continue   # still being written; the next poll shows it
            self._photos.append(photo)
            if i == 0:
                self.big.configure(image=photo)
                self.caption.configure(text=path.name)
            else:
                ttk.Label(self.strip, image=photo).pack(side="left", padx=(0, 4))

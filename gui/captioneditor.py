"""The Captions tab: each image beside its caption, previous/next, the folder's tags with counts,
add / remove / replace a tag in every caption, search, and which tags keep_tokens holds fixed.

Edits are saved atomically when you move to another image (or with Save / Ctrl+S). A caption file
that is not UTF-8 is shown as such and never written. All file logic is library.dataprep.captions;
this module only draws it.
"""
from __future__ import annotations

import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

from library.dataprep.captions import CaptionEncodingError, FolderCaptions, keep_tokens_preview, write_caption
from library.dataprep.images import find_images, open_rgb

PREVIEW_MAX = 512  # longest side of the shown image, before the UI scale


class CaptionEditor(ttk.Frame):
    def __init__(self, master, scale: float = 1.0):
        super().__init__(master, padding=8)
        self.scale = scale
        self.captions: FolderCaptions | None = None
        self.shown: list[Path] = []         # images in the list (after the search filter)
        self.index: int | None = None       # position in self.shown
        self._loaded_text = ""              # the caption as read, to know whether it was edited
        self._editable = False
        self._photo = None                  # keep a reference, or Tk drops the image
        self._photo_source = None           # the PIL image self._photo was made from
        self._image = None                  # the shown image at full size
        self._build()

    # -- building -----------------------------------------------------------------------------
    def _build(self):
        top = ttk.Frame(self)
        top.pack(fill="x")
        ttk.Label(top, text="Image folder:").pack(side="left")
        self.folder_var = tk.StringVar(self)
        entry = ttk.Entry(top, textvariable=self.folder_var, width=48)
        entry.pack(side="left", padx=4, fill="x", expand=True)
        entry.bind("<Return>", lambda e: self.open_folder(self.folder_var.get()))
        ttk.Button(top, text="Browse…", command=self.browse).pack(side="left")
        ttk.Label(top, text="Captions:").pack(side="left", padx=(12, 2))
        self.ext_var = tk.StringVar(self, value=".txt")
        ext = ttk.Combobox(top, textvariable=self.ext_var, values=(".txt", ".caption"), width=9)
        ext.pack(side="left")
        ext.bind("<<ComboboxSelected>>", lambda e: self.reload())
        ext.bind("<Return>", lambda e: self.reload())
        ttk.Checkbutton(top, text="Sub-folders", variable=self._var("recursive", False),
                        command=self.reload).pack(side="left", padx=8)

        # packed before the body so that a short window shrinks the body, never the status line
        self.status = ttk.Label(self, text="Open a folder of images to edit their captions.", style="Muted.TLabel")
        self.status.pack(side="bottom", fill="x", pady=(6, 0))
        body = ttk.PanedWindow(self, orient="horizontal")
        body.pack(fill="both", expand=True, pady=(8, 0))
        body.add(self._build_list(body), weight=1)
        body.add(self._build_editor(body), weight=3)
        body.add(self._build_tags(body), weight=1)

    def _var(self, name, value):
        var = tk.BooleanVar(self, value=value)
        setattr(self, f"{name}_var", var)
        return var

    def _build_list(self, parent):
        frame = ttk.Frame(parent)
        self.search_var = tk.StringVar(self)
        search = ttk.Entry(frame, textvariable=self.search_var)
        search.pack(fill="x")
        search.bind("<KeyRelease>", lambda e: self.apply_search())
        ttk.Label(frame, text="Search captions", style="Muted.TLabel").pack(anchor="w")
        box = ttk.Frame(frame)
        box.pack(fill="both", expand=True)
        self.listbox = tk.Listbox(box, exportselection=False, activestyle="none", width=24)
        bar = ttk.Scrollbar(box, orient="vertical", command=self.listbox.yview)
        self.listbox.configure(yscrollcommand=bar.set)
        self.listbox.pack(side="left", fill="both", expand=True)
        bar.pack(side="right", fill="y")
        self.listbox.bind("<<ListboxSelect>>", lambda e: self._picked())
        return frame

    def _build_editor(self, parent):
        frame = ttk.Frame(parent, padding=(8, 0))
        # The picture is placed, not packed, in a box that takes the space left: a packed label would
        # grow to its image and push the caption box off a small screen.
        self.image_box = ttk.Frame(frame, height=int(200 * self.scale))
        self.image_box.pack(fill="both", expand=True)
        self.image_label = ttk.Label(self.image_box, anchor="center")
        self.image_label.place(relx=0.5, rely=0.5, anchor="center")
        self.image_box.bind("<Configure>", lambda e: self._fit_image())
        self.name_label = ttk.Label(frame, text="", style="Muted.TLabel")
        self.name_label.pack(anchor="w")
        self.text = tk.Text(frame, height=4, wrap="word", undo=True)
        self.text.pack(fill="x")
        self.text.bind("<Control-s>", lambda e: (self.save(), "break")[1])
        self.text.bind("<Control-a>", lambda e: (self.text.tag_add("sel", "1.0", "end-1c"), "break")[1])
        self.text.bind("<KeyRelease>", lambda e: self.update_keep_preview())
        keep = ttk.Frame(frame)
        keep.pack(fill="x", pady=(4, 0))
        ttk.Label(keep, text="keep_tokens").pack(side="left")
        self.keep_var = tk.IntVar(self, value=0)
        ttk.Spinbox(keep, from_=0, to=50, width=4, textvariable=self.keep_var,
                    command=self.update_keep_preview).pack(side="left", padx=4)
        ttk.Label(keep, text="keep_tokens_separator").pack(side="left", padx=(8, 0))
        self.keep_sep_var = tk.StringVar(self)
        sep = ttk.Entry(keep, textvariable=self.keep_sep_var, width=6)
        sep.pack(side="left", padx=4)
        sep.bind("<KeyRelease>", lambda e: self.update_keep_preview())
        self.keep_label = ttk.Label(frame, text="", wraplength=int(520 * self.scale), justify="left")
        self.keep_label.pack(fill="x", pady=(2, 0))
        nav = ttk.Frame(frame)
        nav.pack(fill="x", pady=(6, 0))
        ttk.Button(nav, text="◀ Previous", command=lambda: self.step(-1)).pack(side="left")
        ttk.Button(nav, text="Next ▶", command=lambda: self.step(1)).pack(side="left", padx=4)
        ttk.Button(nav, text="Save", style="Accent.TButton", command=self.save).pack(side="right")
        return frame

    def _build_tags(self, parent):
        frame = ttk.Frame(parent)
        ttk.Label(frame, text="Tags in this folder").pack(anchor="w")
        box = ttk.Frame(frame)
        box.pack(fill="both", expand=True)
        self.tag_tree = ttk.Treeview(box, columns=("count",), show="tree headings", height=10, selectmode="browse")
        self.tag_tree.heading("#0", text="Tag")
        self.tag_tree.heading("count", text="Images")
        self.tag_tree.column("#0", width=int(150 * self.scale), stretch=True)
        self.tag_tree.column("count", width=int(70 * self.scale), anchor="e", stretch=False)
        bar = ttk.Scrollbar(box, orient="vertical", command=self.tag_tree.yview)
        self.tag_tree.configure(yscrollcommand=bar.set)
        self.tag_tree.pack(side="left", fill="both", expand=True)
        bar.pack(side="right", fill="y")
        self.tag_tree.bind("<<TreeviewSelect>>", lambda e: self._tag_picked())
        edit = ttk.Frame(frame)
        edit.pack(fill="x", pady=(6, 0))
        ttk.Label(edit, text="Tag").grid(row=0, column=0, sticky="w")
        self.tag_var = tk.StringVar(self)
        ttk.Entry(edit, textvariable=self.tag_var).grid(row=0, column=1, sticky="ew", padx=4)
        ttk.Label(edit, text="New name").grid(row=1, column=0, sticky="w")
        self.new_tag_var = tk.StringVar(self)
        ttk.Entry(edit, textvariable=self.new_tag_var).grid(row=1, column=1, sticky="ew", padx=4, pady=2)
        edit.columnconfigure(1, weight=1)
        buttons = ttk.Frame(frame)
        buttons.pack(fill="x")
        ttk.Button(buttons, text="Add to all", command=lambda: self.edit_all("add")).pack(side="left")
        ttk.Button(buttons, text="Remove", command=lambda: self.edit_all("remove")).pack(side="left", padx=4)
        ttk.Button(buttons, text="Rename", command=lambda: self.edit_all("replace")).pack(side="left")
        return frame

    # -- actions -------------------------------------------------------------------------------
    def browse(self):
        folder = filedialog.askdirectory(parent=self, title="Folder of images",
                                         initialdir=self.folder_var.get() or None)
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str):
        self.folder_var.set(folder)
        self.reload()

    def reload(self):
        self.save()
        folder = self.folder_var.get().strip()
        if not folder:
            return
        try:
            images = find_images(folder, self.recursive_var.get())
        except Exception as err:  # UserError: not a folder
            self.status.configure(text=str(err), style="Error.TLabel")
            return
        self.captions = FolderCaptions(images, self.ext_var.get() or ".txt")
        self.index = None
        self.apply_search()
        self.refresh_tags()
        if self.shown:
            self.show(0)

    def apply_search(self):
        if self.captions is None:
            return
        text = self.search_var.get().strip()
        current = self.current()
        self.shown = self.captions.search(text) if text else list(self.captions.images)
        self.listbox.delete(0, "end")
        root = Path(self.folder_var.get())
        for image in self.shown:
            try:
                name = str(image.relative_to(root))
            except ValueError:
                name = image.name
            self.listbox.insert("end", name)
        self.index = self.shown.index(current) if current in self.shown else None
        if self.index is not None:
            self.listbox.selection_set(self.index)

    def refresh_tags(self):
        if self.captions is None:
            return
        counts = self.captions.tag_counts()
        self.tag_tree.delete(*self.tag_tree.get_children())
        for tag, n in counts.items():
            self.tag_tree.insert("", "end", text=tag, values=(n,))
        text = f"{len(self.captions.images)} images, {len(counts)} different tags"
        if self.captions.unreadable:
            names = ", ".join(p.name for p in self.captions.unreadable[:5])
            text += (f". {len(self.captions.unreadable)} caption file(s) are not UTF-8 and are left untouched: "
                     f"{names}")
        self.status.configure(text=text, style="Error.TLabel" if self.captions.unreadable else "Muted.TLabel")

    def current(self) -> Path | None:
        return None if self.index is None or self.index >= len(self.shown) else self.shown[self.index]

    def show(self, index: int):
        self.save()
        self.index = index
        self.listbox.selection_clear(0, "end")
        self.listbox.selection_set(index)
        self.listbox.see(index)
        image = self.shown[index]
        self._show_image(image)
        self.text.configure(state="normal")
        self.text.delete("1.0", "end")
        try:
            self._loaded_text = self.captions.read(image)
            self._editable = True
            self.text.insert("1.0", self._loaded_text)
            self.name_label.configure(text=f"{self.captions.caption_file(image).name}   ({index + 1}/{len(self.shown)})")
        except CaptionEncodingError as err:
            self._editable = False
            self.text.insert("1.0", str(err))
            self.text.configure(state="disabled")
            self.name_label.configure(text=f"{err.path.name}: not UTF-8, not editable here")
        self.text.edit_reset()
        self.update_keep_preview()

    def _show_image(self, path: Path):
        self._image, reason = open_rgb(path)
        if self._image is None:
            self._photo = None
            self.image_label.configure(image="", text=f"{path.name} cannot be shown: {reason}")
            return
        self._fit_image()

    def _fit_image(self):
        """Scale the shown image (up or down) to the box it has, keeping its aspect ratio."""
        from PIL import Image, ImageTk

        if getattr(self, "_image", None) is None:
            return
        box_w, box_h = self.image_box.winfo_width(), self.image_box.winfo_height()
        if box_w < 32 or box_h < 32:  # not laid out yet
            box_w = box_h = int(PREVIEW_MAX * self.scale)
        w, h = self._image.size
        factor = min(box_w / w, box_h / h)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        if self._photo is not None and (self._photo.width(), self._photo.height()) == size \
                and self._photo_source is self._image:
            return
        self._photo = ImageTk.PhotoImage(self._image.resize(size, Image.LANCZOS), master=self)
        self._photo_source = self._image
        self.image_label.configure(image=self._photo, text="")

    def step(self, delta: int):
        if not self.shown:
            return
        index = 0 if self.index is None else min(max(self.index + delta, 0), len(self.shown) - 1)
        self.show(index)

    def _picked(self):
        chosen = self.listbox.curselection()
        if chosen and chosen[0] != self.index:
            self.show(chosen[0])

    def _tag_picked(self):
        chosen = self.tag_tree.selection()
        if chosen:
            self.tag_var.set(self.tag_tree.item(chosen[0], "text"))

    def edited_text(self) -> str:
        return self.text.get("1.0", "end-1c")

    def save(self) -> bool:
        """Write the shown caption if it was edited; True when a file was written."""
        image = self.current()
        if image is None or not self._editable or self.captions is None:
            return False
        text = self.edited_text().strip()
        if text == self._loaded_text.strip():
            return False
        write_caption(self.captions.caption_file(image), text)
        self._loaded_text = text
        self.refresh_tags()
        return True

    def edit_all(self, action: str):
        if self.captions is None:
            return
        self.save()
        tag, new = self.tag_var.get().strip(), self.new_tag_var.get().strip()
        if not tag:
            self.status.configure(text="Type or pick a tag first.", style="Error.TLabel")
            return
        if action == "add":
            changed = self.captions.add_tag(tag)
        elif action == "remove":
            changed = self.captions.remove_tag(tag)
        else:
            changed = self.captions.replace_tag(tag, new)
        self.refresh_tags()
        self.status.configure(text=self.status.cget("text") + f" · {action}: {changed} caption file(s) changed")
        if self.index is not None:
            self._editable = False  # the file changed under the editor: reload it without saving
            self.show(self.index)

    def update_keep_preview(self):
        fixed, shuffled, suffix = keep_tokens_preview(self.edited_text() if self._editable else "",
                                                      self._keep_tokens(), self.keep_sep_var.get())
        parts = [f"fixed: {', '.join(fixed) or '—'}", f"shuffled: {', '.join(shuffled) or '—'}"]
        if suffix:
            parts.append(f"fixed at the end: {', '.join(suffix)}")
        self.keep_label.configure(text="   ".join(parts))

    def _keep_tokens(self) -> int:
        try:
            return max(0, int(self.keep_var.get()))
        except (tk.TclError, ValueError):
            return 0

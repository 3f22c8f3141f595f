"""The Dataset tab: what the trainer will see in a training tab's dataset (folders, repeats,
images, captions, steps per epoch, bucket histogram), and a helper that builds the
`<repeats>_<name>` folder layout from a plain folder of images."""
from __future__ import annotations

import os
import shutil
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

from gui import preflight
from gui.theme import palette

LAYOUT_HELP = """train_data_dir is the PARENT folder; each subfolder
is named <repeats>_<class token> and holds the images
with their caption files:

  my_dataset/       <- train_data_dir
    10_mychar/      <- 10 repeats, class token "mychar"
      img001.png
      img001.txt    <- caption (optional)"""

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def make_repeats_folder(images: Path, parent: Path, repeats: int, name: str) -> Path:
    """Copy the images (and same-named caption files) of `images` into parent/<repeats>_<name>."""
    if repeats < 1:
        raise ValueError("repeats must be 1 or more")
    name = name.strip()
    if not name:
        raise ValueError("give the class token (the name part of the folder)")
    if not images.is_dir():
        raise ValueError(f"not a folder: {images}")
    target = parent / f"{repeats}_{name}"
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for f in sorted(images.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
            shutil.copy2(f, target / f.name)
            copied += 1
            for cap in images.glob(f"{f.stem}.*"):
                if cap.suffix.lower() in (".txt", ".caption"):
                    shutil.copy2(cap, target / cap.name)
    if not copied:
        raise ValueError(f"no images in {images}")
    return target


class DatasetTab(ttk.Frame):
    def __init__(self, master, app):
        super().__init__(master, padding=8)
        self.app = app
        top = ttk.Frame(self)
        top.pack(fill="x")
        ttk.Label(top, text="Dataset of the tab:").pack(side="left")
        self.tab_var = tk.StringVar(self)
        names = [t.entry.tab for t in app.train_tabs()]
        self.tab_box = ttk.Combobox(top, textvariable=self.tab_var, values=names, state="readonly", width=18)
        self.tab_box.pack(side="left", padx=4)
        if names:
            self.tab_var.set(names[0])
        self.check_button = ttk.Button(top, text="Check dataset", style="Accent.TButton", command=self.check)
        self.check_button.pack(side="left", padx=4)
        self.state = ttk.Label(top, text="", style="Muted.TLabel")
        self.state.pack(side="left", padx=8)

        body = ttk.PanedWindow(self, orient="horizontal")
        body.pack(fill="both", expand=True, pady=6)
        left = ttk.Frame(body)
        right = ttk.Frame(body)
        body.add(left, weight=3)
        body.add(right, weight=2)
        self.tree = ttk.Treeview(left, columns=("kind", "repeats", "images", "captions", "steps"), show="tree headings",
                                 height=6)
        self.tree.heading("#0", text="Folder")
        self.tree.column("#0", width=int(260 * app.scale), stretch=True)
        for col, title in (("kind", "Kind"), ("repeats", "Repeats"), ("images", "Images"),
                           ("captions", "Captioned"), ("steps", "Images × repeats")):
            self.tree.heading(col, text=title)
            self.tree.column(col, width=int(72 * app.scale), anchor="e", stretch=False)
        self.tree.pack(fill="x")
        self.plan = ttk.Label(left, text="", style="Heading.TLabel", wraplength=int(700 * app.scale), justify="left")
        self.plan.pack(anchor="w", pady=(6, 0))
        self.problems = ttk.Label(left, text="", style="Problem.TLabel", wraplength=int(700 * app.scale),
                                  justify="left")
        self.problems.pack(anchor="w")
        ttk.Label(left, text="Buckets (resolution: images × repeats)", style="Heading.TLabel").pack(anchor="w",
                                                                                                 pady=(6, 0))
        self.hist = tk.Canvas(left, height=int(150 * app.scale), highlightthickness=0)
        self.hist.pack(fill="x")
        self.details = tk.Text(left, height=6, wrap="word", relief="flat", font="TkFixedFont")
        self.details.pack(fill="both", expand=True, pady=(6, 0))
        self.details.insert("1.0", "“Check dataset” reads the dataset settings of the chosen tab (train_data_dir, "
                                   "reg_data_dir or dataset_config, resolution, buckets, batch size) and shows what "
                                   "the trainer will see: folders, repeats, images, captions, steps per epoch and "
                                   "the bucket histogram. Every problem is listed at once.")
        self.details.configure(state="disabled")
        self._build_helper(right)
        self._build_prepare(top)
        self.report = None
        self.hist.bind("<Configure>", lambda e: self.draw_histogram())

    def _build_helper(self, parent):
        ttk.Label(parent, text="Folder layout", style="Heading.TLabel").pack(anchor="w")
        ttk.Label(parent, text=LAYOUT_HELP, font="TkFixedFont", justify="left").pack(anchor="w", pady=(2, 8))
        box = ttk.LabelFrame(parent, text="Make a <repeats>_<name> folder from a folder of images", padding=6)
        box.pack(fill="x")
        box.columnconfigure(1, weight=1)
        self.h_images, self.h_parent = tk.StringVar(self), tk.StringVar(self)
        self.h_repeats, self.h_name = tk.StringVar(self, value="10"), tk.StringVar(self)
        rows = [("Images folder", self.h_images, True), ("Dataset folder (parent)", self.h_parent, True),
                ("Repeats", self.h_repeats, False), ("Class token", self.h_name, False)]
        for r, (label, var, browse) in enumerate(rows):
            ttk.Label(box, text=label).grid(row=r, column=0, sticky="w", pady=2)
            ttk.Entry(box, textvariable=var, width=26 if browse else 10).grid(row=r, column=1, sticky="ew")
            if browse:
                ttk.Button(box, text="Folder…", width=7,
                           command=lambda v=var: v.set(filedialog.askdirectory(parent=self) or v.get())
                           ).grid(row=r, column=2, padx=4)
        ttk.Button(box, text="Create and use it", command=self.make_folder).grid(row=4, column=1, sticky="w", pady=4)
        self.h_state = ttk.Label(box, text="", style="Muted.TLabel", wraplength=int(380 * self.app.scale))
        self.h_state.grid(row=5, column=0, columnspan=3, sticky="w")

    def _build_prepare(self, bar):
        """Buttons into the dataset-preparation tools, on the Images folder below (else the tab's
        train_data_dir), at the right of the top bar."""
        actions = [("Resize…", lambda: self.open_tool("Resize images")),
                   ("Caption (BLIP)…", lambda: self.open_tool("Captioner")),
                   ("Tag (WD14)…", lambda: self.open_tool("Tagger")), ("Edit captions", self.edit_captions)]
        for text, command in actions:
            ttk.Button(bar, text=text, command=command).pack(side="right", padx=2)
        ttk.Label(bar, text="Prepare images:", style="Muted.TLabel").pack(side="right", padx=(8, 2))

    def prepare_folder(self) -> tuple[str, bool]:
        """(folder, whether it is a train_data_dir of <repeats>_<name> sub-folders): the Images folder
        above, else the chosen tab's train_data_dir."""
        folder = self.h_images.get().strip()
        if folder:
            return folder, False
        tab = self.target_tab()
        field = tab.form.fields.get("train_data_dir") if tab is not None else None
        return (field.var.get().strip(), True) if field is not None else ("", False)

    def edit_captions(self):
        editor = self.app.caption_editor
        self.app.notebook.select(editor)
        folder, parent = self.prepare_folder()
        if folder:
            editor.recursive_var.set(parent)
            editor.open_folder(folder)

    def open_tool(self, title: str):
        """Show the tool's page with its image folder (its first positional argument) filled in."""
        tools = self.app.tools_notebook
        holder = next((h for h in tools.tabs() if tools.tab(h, "text") == title), None)
        if holder is None:
            self.h_state.configure(text=f"⚠ the {title} tool is not installed", style="Problem.TLabel")
            return
        self.app.notebook.select(self.app.tools_page)
        tools.select(holder)
        tab = self.app.tool_tab(holder)
        folder = self.prepare_folder()[0]
        if tab is not None and folder:
            for dest in ("train_data_dir", "src_img_folder"):
                if dest in tab.form.fields:
                    tab.form.fields[dest].var.set(folder)
                    break

    def target_tab(self):
        for tab in self.app.train_tabs():
            if tab.entry.tab == self.tab_var.get():
                return tab
        return None

    def make_folder(self):
        try:
            target = make_repeats_folder(Path(self.h_images.get()), Path(self.h_parent.get()),
                                         int(self.h_repeats.get() or 0), self.h_name.get())
        except (ValueError, OSError) as err:
            self.h_state.configure(text=f"⚠ {err}", style="Problem.TLabel")
            return
        tab = self.target_tab()
        if tab is not None and "train_data_dir" in tab.form.fields:
            tab.form.fields["train_data_dir"].var.set(str(target.parent))
        self.h_state.configure(text=f"created {target}; train_data_dir is now {target.parent}", style="Muted.TLabel")
        self.check()

    # -- checking --------------------------------------------------------------------------
    def check(self):
        tab = self.target_tab()
        if tab is None:
            return
        snap = tab.snapshot()
        snap["required"] = [("train_data_dir", "dataset_config")]
        snap["path_kinds"] = {k: v for k, v in snap["path_kinds"].items() if k in preflight.DATASET_KEYS}
        self.state.configure(text="checking… (every image is opened once)")
        self.check_button.configure(state="disabled")
        self.app.in_thread(lambda: preflight.check(snap, self.app.cwd), self.show)

    def show(self, result: preflight.Result):
        self.check_button.configure(state="normal")
        self.state.configure(text="ok" if result.ok else f"{len(result.problems)} problem(s)")
        self.problems.configure(text="\n".join(f"⚠ {p.message}" for p in result.problems))
        if result.dataset is not None or result.problems:
            self.show_report(result.dataset)

    def show_report(self, report: preflight.DatasetReport | None):
        self.report = report
        self.tree.delete(*self.tree.get_children())
        self.details.configure(state="normal")
        self.details.delete("1.0", "end")
        if report is not None:
            for f in report.folders:
                self.tree.insert("", "end", text=os.path.basename(os.path.normpath(f["dir"])), values=(
                    "reg" if f["reg"] else "train", f["repeats"], f["images"], f["captions"],
                    f["images"] * f["repeats"]))
            self.plan.configure(text=f"{report.steps_per_epoch} batches per epoch.  {report.plan}")
            self.details.insert("1.0", report.summary + ("\n\n" + report.notes if report.notes else ""))
        else:
            self.plan.configure(text="")
        self.details.configure(state="disabled")
        self.draw_histogram()

    def draw_histogram(self):
        c = self.hist
        c.delete("all")
        if not self.report or not self.report.buckets:
            return
        p = palette(self)
        c.configure(background=p["bg"])
        width, height = max(200, c.winfo_width()), max(80, c.winfo_height())
        buckets = self.report.buckets[:24]
        top = max(n for _, _, n in buckets)
        slot = width / len(buckets)
        bar_w = max(6, min(60, slot * 0.7))
        for i, (w, h, n) in enumerate(buckets):
            x = i * slot + (slot - bar_w) / 2
            bar_h = (height - 36) * n / top
            c.create_rectangle(x, height - 20 - bar_h, x + bar_w, height - 20, fill=p["accent"], outline="")
            c.create_text(x + bar_w / 2, height - 20 - bar_h - 8, text=str(n), fill=p["fg"], font="TkSmallCaptionFont")
            c.create_text(x + bar_w / 2, height - 9, text=f"{w}x{h}", fill=p["muted"], font="TkSmallCaptionFont")

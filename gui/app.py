"""The main window: one tab per available script, Tools, Dataset and Queue tabs, and the run
panel. Runs one script at a time; Tk is only touched from this thread (workers report through
a queue drained by `_poll`)."""
from __future__ import annotations

import os
import queue
import re
import tkinter as tk
from tkinter import ttk

from gui import presets, registry, theme
from gui.captioneditor import CaptionEditor
from gui.datasettab import DatasetTab
from gui.queuetab import QueueTab
from gui.runcontrol import POLL_MS, RunControl
from gui.runner import Run
from gui.runpanel import RunPanel
from gui.scripttab import ScriptTab
from gui.sessions import restore_session, restore_tab, save_session
from gui.tensorboard import TensorBoard
from gui.widgets import Dialog, close_tips

TITLE = "sd-trainers"


class App(RunControl):
    def __init__(self, root: tk.Tk, entries=None, cwd: str | None = None, theme_mode: str | None = None,
                 scale: float | None = None, restore: bool = True, stop_grace: float = 60.0):
        self.root, self.cwd, self.stop_grace = root, os.path.abspath(cwd or os.getcwd()), stop_grace
        self.session = presets.read_session() if restore else {}
        self.scale = theme.apply_scaling(root, scale or self.session.get("scale"))
        self.theme_mode = tk.StringVar(root, value=theme_mode or self.session.get("theme", "system"))
        self.palette = theme.apply_theme(root, self.theme_mode.get())
        self.launcher = self.session.get("launcher", "python")
        root.title(TITLE)
        self.run: Run | None = None
        self.run_done = None
        self.run_tab: ScriptTab | None = None
        self.run_output = None          # the running trainer's output folder (Save now / Sample now)
        self.results: queue.Queue = queue.Queue()
        self.tensorboard = TensorBoard()
        self.dialogs: list[Dialog] = []
        self._closing = False
        self._destroyed = False
        self._poll_id = None

        self.present = registry.present(entries)
        self.missing = registry.missing(entries)
        self._lazy: dict = {}                 # tool page -> entry, loaded when first shown
        self._pages: dict = {}                # tool page -> its ScriptTab
        self._build()
        self._bind_keys()
        self._geometry()
        if restore:
            restore_session(self)
        self._tab_changed()
        self._poll_id = root.after(POLL_MS, self._poll)
        root.protocol("WM_DELETE_WINDOW", self.on_close)

    # -- building --------------------------------------------------------------------------
    def _build(self):
        self._build_menu()
        outer = ttk.Frame(self.root)
        outer.pack(fill="both", expand=True)
        self.statusbar = ttk.Label(outer, text="Ready. F5 starts the current tab, Shift+F5 stops, Ctrl+F finds "
                                               "an option, Ctrl+S saves the preset.", style="Muted.TLabel",
                                   padding=(8, 2))
        self.statusbar.pack(side="bottom", fill="x")
        self.panes = ttk.PanedWindow(outer, orient="vertical")
        self.panes.pack(fill="both", expand=True)
        self.notebook = ttk.Notebook(self.panes)
        self.notebook.enable_traversal()          # Ctrl+Tab / Ctrl+Shift+Tab switch tabs
        self.tabs: dict[str, ScriptTab] = {}      # module -> tab, training and tools
        for entry in self.present:
            loaded = registry.load_script(entry) if entry.kind == "train" else None
            if loaded is not None:
                self.notebook.add(self._script_page(self.notebook, loaded), text=entry.tab)
        self.tools_page = ttk.Frame(self.notebook, padding=4)
        self._build_tools(self.tools_page)
        self.notebook.add(self.tools_page, text="Tools")
        self.dataset_tab = DatasetTab(self.notebook, self)
        self.notebook.add(self.dataset_tab, text="Dataset")
        self.caption_editor = CaptionEditor(self.notebook, scale=self.scale)
        self.notebook.add(self.caption_editor, text="Captions")
        self.queue_tab = QueueTab(self.notebook, self)
        self.notebook.add(self.queue_tab, text="Queue")
        self.run_panel = RunPanel(self.panes, on_stop=self.stop_run, scale=self.scale, on_request=self.request_now)
        self.run_panel.samples.folder_source = self._gallery_folder
        self.panes.add(self.notebook, weight=3)
        self.panes.add(self.run_panel, weight=1)

    def import_kohya_ss(self, path=None):
        """File > Import kohya_ss preset…: the JSON becomes one of our presets, loaded into its tab,
        with what had no equivalent listed above the form. Returns the new preset's path."""
        from pathlib import Path
        from tkinter import filedialog

        from gui.kohya_import import convert
        from library.errors import UserError

        path = path or filedialog.askopenfilename(parent=self.root, title="kohya_ss preset (.json)",
                                                  filetypes=[("kohya_ss preset", "*.json"), ("All files", "*")])
        if not path:
            return None
        try:
            out, script, notes = convert(Path(path))
        except UserError as err:
            self.dialogs.append(Dialog(self.root, "Import kohya_ss preset", "This preset cannot be imported",
                                       str(err), kind="error"))
            return None
        tab = self.tabs.get(script)
        tab.refresh_presets()
        tab.load_file(out)
        tab.show_notes([f"Imported from the kohya_ss preset {path} as the preset {out.stem!r}."] + notes)
        self.notebook.select(tab)
        return out

    def _script_page(self, parent, item: registry.LoadedScript):
        if item.ok:
            tab = ScriptTab(parent, self, item)
            self.tabs[item.entry.module] = tab
            return tab
        page = ttk.Frame(parent, padding=12)
        ttk.Label(page, text=item.error, style="Error.TLabel", wraplength=int(900 * self.scale)).pack(anchor="w")
        return page

    def _build_tools(self, page):
        # tools are imported when first shown: some import torch, which would slow the start
        tools = [e for e in self.present if e.kind == "tool"]
        absent = [e for e in self.missing if e.kind == "tool"]
        if absent:
            names = ", ".join(f"{e.tab} ({e.path.name})" for e in absent)
            ttk.Label(page, text=f"Not installed yet: {names}. A tool appears here as soon as its script exists.",
                      style="Muted.TLabel", wraplength=int(1100 * self.scale), justify="left").pack(anchor="w")
        self.tools_notebook = ttk.Notebook(page)
        for entry in tools:
            holder = ttk.Frame(self.tools_notebook)
            self._lazy[str(holder)] = entry
            self.tools_notebook.add(holder, text=entry.tab)
        if tools:
            self.tools_notebook.pack(fill="both", expand=True, pady=(4, 0))
            self.tools_notebook.bind("<<NotebookTabChanged>>", lambda e: (self.tool_tab(), self._tab_changed()),
                                     add="+")
            self.notebook.bind("<<NotebookTabChanged>>", lambda e: self.tool_tab(), add="+")

    def tool_tab(self, holder=None) -> ScriptTab | None:
        """The shown tool's tab (or `holder`'s), importing its script on first use."""
        if holder is None:
            if self.notebook.select() != str(self.tools_page) or not self.tools_notebook.tabs():
                return None
            holder = self.tools_notebook.select()
        holder = str(holder)
        if holder in self._lazy:
            entry = self._lazy.pop(holder)
            frame = self.root.nametowidget(holder)
            page = self._script_page(frame, registry.load_script(entry))
            page.pack(fill="both", expand=True)
            self._pages[holder] = page
            if isinstance(page, ScriptTab):
                restore_tab(self, page)
        page = self._pages.get(holder)
        return page if isinstance(page, ScriptTab) else None

    def load_all_tools(self) -> list[ScriptTab]:
        return [t for t in (self.tool_tab(h) for h in self.tools_notebook.tabs()) if t is not None]

    def _build_menu(self):
        menu = tk.Menu(self.root)
        file_menu = tk.Menu(menu, tearoff=False)
        file_menu.add_command(label="Open preset…", accelerator="Ctrl+O", command=lambda: self._on_tab("open_file"))
        file_menu.add_command(label="Save preset", accelerator="Ctrl+S", command=lambda: self._on_tab("save"))
        file_menu.add_command(label="Save preset as…", accelerator="Ctrl+Shift+S",
                              command=lambda: self._on_tab("save_as"))
        file_menu.add_command(label="Import kohya_ss preset…", command=self.import_kohya_ss)
        file_menu.add_separator()
        file_menu.add_command(label="Quit", accelerator="Ctrl+Q", command=self.on_close)
        run_menu = tk.Menu(menu, tearoff=False)
        run_menu.add_command(label="Start", accelerator="F5", command=self.start_current)
        run_menu.add_command(label="Stop", accelerator="Shift+F5", command=self.stop_run)
        run_menu.add_command(label="Check", accelerator="F7", command=lambda: self._on_tab(None, check=True))
        view_menu = tk.Menu(menu, tearoff=False)
        for mode in ("system", "light", "dark"):
            view_menu.add_radiobutton(label=f"{mode.capitalize()} theme", value=mode, variable=self.theme_mode,
                                      command=self.set_theme)
        menu.add_cascade(label="File", menu=file_menu, underline=0)
        menu.add_cascade(label="Run", menu=run_menu, underline=0)
        menu.add_cascade(label="View", menu=view_menu, underline=0)
        self.root.configure(menu=menu)

    def _bind_keys(self):
        r = self.root
        r.bind("<F5>", lambda e: self.start_current())
        r.bind("<Shift-F5>", lambda e: self.stop_run())
        r.bind("<F7>", lambda e: self._on_tab(None, check=True))
        r.bind("<Control-s>", lambda e: self._on_tab("save"))
        r.bind("<Control-S>", lambda e: self._on_tab("save_as"))
        r.bind("<Control-o>", lambda e: self._on_tab("open_file"))
        r.bind("<Control-q>", lambda e: self.on_close())
        r.bind("<Control-f>", lambda e: self._focus_filter())
        for i in range(1, 10):
            r.bind(f"<Alt-Key-{i}>", lambda e, i=i: self._select_tab(i - 1))
        # Ctrl+A selects all in text fields (Tk's default moves to the line start, emacs-style)
        for cls in ("TEntry", "TCombobox", "Entry"):
            r.bind_class(cls, "<Control-a>", self._select_all_entry)
        r.bind_class("Text", "<Control-a>", lambda e: (e.widget.tag_add("sel", "1.0", "end-1c"), "break")[1])
        self.notebook.bind("<<NotebookTabChanged>>", lambda e: self._tab_changed(), add="+")

    @staticmethod
    def _select_all_entry(event):
        event.widget.selection_range(0, "end")
        event.widget.icursor("end")
        return "break"

    def _gallery_folder(self):
        tab = self.current_tab() or (self.run_tab if self.run_tab is not None else None)
        return tab.image_folder() if tab is not None else None

    def _tab_changed(self):
        tab = self.current_tab()
        if tab is not None and "sample_prompts" in tab.form.fields:
            hint = "Sample images appear here during a run (set the Sample prompts file, then Edit… it)."
        elif tab is not None and tab.image_option():
            hint = f"Images this tool writes (to {tab.image_option()}) appear here."
        else:
            hint = "Images a run writes appear here."
        self.run_panel.samples.set_hint(hint)

    def _geometry(self):
        sw, sh = self.root.winfo_screenwidth(), self.root.winfo_screenheight()
        # most of a big screen, all of a small one; room for the desktop's panels
        w = min(sw, max(int(1280 * self.scale), int(sw * 0.9)))
        w = sw if sw - w < 100 else w         # a small screen: all of its width
        h = min(sh - int(60 * self.scale), max(int(880 * self.scale), int(sh * 0.9)))
        geometry = f"{w}x{h}+0+0"
        saved = re.fullmatch(r"(\d+)x(\d+)\+(-?\d+)\+(-?\d+)", self.session.get("geometry") or "")
        if saved:   # the last size, but never larger than this screen (it may be another monitor)
            sw, sh, sx, sy = (int(v) for v in saved.groups())
            sw, sh = min(sw, self.root.winfo_screenwidth()), min(sh, self.root.winfo_screenheight())
            sx = max(0, min(sx, self.root.winfo_screenwidth() - sw))
            sy = max(0, min(sy, self.root.winfo_screenheight() - sh))
            geometry = f"{sw}x{sh}+{sx}+{sy}"
        self.root.geometry(geometry)
        self.root.minsize(min(int(800 * self.scale), w), min(int(560 * self.scale), h))
        self.root.update_idletasks()
        # the form gets two thirds of the height; the run panel the rest
        self.panes.sashpos(0, int(self.root.winfo_height() * 0.7))

    # -- helpers ---------------------------------------------------------------------------
    def train_tabs(self) -> list[ScriptTab]:
        return [t for t in self.tabs.values() if t.entry.kind == "train"]

    def current_tab(self) -> ScriptTab | None:
        page = self.root.nametowidget(self.notebook.select()) if self.notebook.select() else None
        if page is self.tools_page:
            return self.tool_tab()
        return page if isinstance(page, ScriptTab) else None

    def _on_tab(self, method: str | None, check: bool = False):
        tab = self.current_tab()
        if tab is not None:
            self.check_tab(tab) if check else getattr(tab, method)()
        return "break"

    def _focus_filter(self):
        tab = self.current_tab()
        if tab is not None:
            tab.filter_entry.focus_set()
        return "break"

    def _select_tab(self, index: int):
        if index < len(self.notebook.tabs()):
            self.notebook.select(index)
        return "break"

    def status(self, text: str):
        self.statusbar.configure(text=text)

    def busy(self) -> bool:
        return self.run is not None and self.run.running

    def set_theme(self):
        self.palette = theme.apply_theme(self.root, self.theme_mode.get())
        theme.restyle_plain(self.root)
        self.run_panel.restyle()
        self.dataset_tab.draw_histogram()

    # -- closing ---------------------------------------------------------------------------
    def on_close(self, force: bool = False):
        """Save the session; a running script is stopped first (it saves its state)."""
        if self._destroyed or self._closing and not force:
            return
        save_session(self)
        if self.busy() and not force:
            self._closing = True
            self.status("stopping the run before closing…")
            self.run.stop()
            self.run_panel.stopping()
            return
        if self.busy():
            self.run.kill()
        self._closing = True
        self._destroy()

    def _destroy(self):
        self.tensorboard.stop()
        self.run_panel.samples.stop()
        for tab in self.tabs.values():
            tab.cancel_timers()
        close_tips(self.root)
        # cancel every pending after() (ours, ttk's, tooltips'): none may fire into a dead interpreter
        # (`after cancel` only: the Python callbacks are freed with their widgets; deleting them
        # here as after_cancel does would make destroy() fail on the second delete)
        for timer in self.root.tk.splitlist(self.root.tk.call("after", "info")):
            self.root.tk.call("after", "cancel", timer)
        self._poll_id = None
        self._destroyed = True
        self.root.destroy()

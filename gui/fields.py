"""One option's widgets (checkbox, dropdown or entry with file buttons, help, problem mark) and
its text <-> value logic, built from a FieldSpec."""
from __future__ import annotations

import os
import tkinter as tk
from tkinter import filedialog, ttk

from gui import layout
from gui.specs import FieldSpec, bool_value, is_default, parse_text, value_to_text
from gui.widgets import attach_tip

# The folder each option's file dialog showed last ("" key: the last folder of any dialog);
# kept in the session so it survives a restart.
LAST_DIRS: dict[str, str] = {}


def hide_dot_folders(widget) -> None:
    """Tk's own file dialog (Linux) lists .cache, .git...: hide them, keep its toggle."""
    try:
        widget.tk.call("tk_getOpenFile", "-no-such-option")   # loads the dialog's namespace
    except tk.TclError:
        pass
    try:
        widget.tk.call("set", "::tk::dialog::file::showHiddenBtn", "1")
        widget.tk.call("set", "::tk::dialog::file::showHiddenVar", "0")
    except tk.TclError:
        pass


class Field:
    """The widgets of one option and its text <-> value logic."""

    def __init__(self, form: "Form", spec: FieldSpec, path_kind: str | None):
        self.form, self.spec, self.path_kind = form, spec, path_kind
        self.problem: str | None = None
        self.needed = spec.required
        self.visible = True
        self.widgets: list[tk.Widget] = []
        self.section = None

    # -- building --------------------------------------------------------------------------
    def build_bool(self, parent):
        self.var = tk.BooleanVar(parent, value=False)
        self.widget = ttk.Checkbutton(parent, text=self.label_text(), variable=self.var, name=f"f_{self.spec.dest}")
        attach_tip(self.widget, self.tip_text)
        self.widgets = [self.widget]
        self.var.trace_add("write", lambda *a: self.form.changed(self))
        self.widget.bind("<FocusIn>", lambda e: self.form.scroll.scroll_to(self.widget), add="+")

    def build_row(self, parent, row: int):
        spec = self.spec
        self.label = ttk.Label(parent, text=self.label_text() + (" *" if self.needed else ""), style="Field.TLabel")
        self.var = tk.StringVar(parent, value="")
        if spec.kind in ("choice", "tristate"):
            choices = spec.choices if spec.kind == "choice" else [True, False]
            values = [value_to_text(spec, c) for c in choices]
            if spec.default is None:
                values = [""] + values
            self.widget = ttk.Combobox(parent, textvariable=self.var, values=values, state="readonly",
                                       width=28, name=f"f_{spec.dest}")
        elif spec.dest in layout.SUGGESTIONS:   # usual values in a list, any other can be typed
            self.widget = ttk.Combobox(parent, textvariable=self.var, values=layout.SUGGESTIONS[spec.dest],
                                       width=28, name=f"f_{spec.dest}")
        else:
            self.widget = ttk.Entry(parent, textvariable=self.var, width=40 if self.path_kind else 24,
                                    name=f"f_{spec.dest}", show="•" if layout.is_secret(spec.dest) else "")
        self.buttons = ttk.Frame(parent)
        if self.path_kind:
            kinds = {"file_or_dir": ("file", "dir")}.get(self.path_kind, (self.path_kind,))
            for kind in kinds:
                text = "Folder…" if "dir" in kind else "File…"
                ttk.Button(self.buttons, text=text, width=7, command=lambda k=kind: self.browse(k)).pack(side="left")
        self.help = ttk.Label(parent, text=self.short_help(), style="Help.TLabel", wraplength=self.form.help_wrap,
                              justify="left")
        self.row = 2 * row   # the help text goes beside the widget, or in the row below when narrow
        self.label.grid(row=self.row, column=0, sticky="w", padx=(4, 8), pady=2)
        self.widget.grid(row=self.row, column=1, sticky="ew" if self.path_kind else "w", pady=2)
        self.buttons.grid(row=self.row, column=2, sticky="w", padx=(4, 4))
        self.place_help("right", self.form.help_wrap)
        self.widgets = [self.label, self.widget, self.buttons, self.help]
        for w in (self.label, self.widget):
            attach_tip(w, self.tip_text)
        self.var.trace_add("write", lambda *a: self.form.changed(self))
        self.widget.bind("<FocusIn>", lambda e: self.form.scroll.scroll_to(self.widget), add="+")

    def label_text(self) -> str:
        return layout.label_of(self.spec.dest)

    def place_help(self, side: str, wrap: int):
        self.help.configure(wraplength=wrap)
        if side == "right":
            self.help.grid(row=self.row, column=3, columnspan=1, sticky="w", padx=(4, 4), pady=0)
        else:
            self.help.grid(row=self.row + 1, column=1, columnspan=3, sticky="w", padx=(0, 4), pady=(0, 3))
        if not self.visible:
            self.help.grid_remove()

    def help_text(self) -> str:
        """The help as argparse prints it (%(default)s filled in, %% unescaped)."""
        spec = self.spec
        try:
            return spec.help % {"default": spec.default, "dest": spec.dest, "choices": spec.choices,
                                "type": getattr(spec.type, "__name__", spec.type), "prog": ""}
        except (KeyError, TypeError, ValueError):
            return spec.help

    def short_help(self) -> str:
        text = self.help_text()
        return text if len(text) <= 150 else text[:147].rsplit(" ", 1)[0] + " …"

    def tip_text(self) -> str:
        spec = self.spec
        lines = [f"{self.label_text()}  ·  {spec.flag}" + ("  (required)" if self.needed else "")]
        if spec.help:
            lines.append(self.help_text())
        if spec.choices:
            lines.append("choices: " + ", ".join(map(str, spec.choices)))
        if spec.kind != "bool":
            lines.append(f"default: {value_to_text(spec, spec.default) or '(none)'}")
        if spec.kind == "list":
            lines.append("several values: separate with spaces, quote values that contain spaces")
        if self.problem:
            lines.append(f"PROBLEM: {self.problem}")
        return "\n".join(lines)

    def start_folder(self) -> str:
        """The dialog's first folder: the field's own value, else where this option's dialog was
        last, else where any dialog was last, else the working folder."""
        current = self.var.get().strip().strip('"')
        if current:
            folder = current if os.path.isdir(current) else os.path.dirname(current)
            if folder and os.path.isdir(folder):
                return folder
        for key in (self.spec.dest, ""):
            if os.path.isdir(LAST_DIRS.get(key, "")):
                return LAST_DIRS[key]
        return os.getcwd()

    def browse(self, kind: str):
        start = self.start_folder()
        hide_dot_folders(self.widget)
        types = layout.file_types(self.spec.dest)
        if kind in ("dir", "save_dir"):
            chosen = filedialog.askdirectory(parent=self.widget, initialdir=start, mustexist=kind == "dir")
            folder = chosen
        elif kind == "save_file":
            chosen = filedialog.asksaveasfilename(parent=self.widget, initialdir=start, filetypes=types)
            folder = os.path.dirname(chosen) if chosen else ""
        elif kind == "files":
            picked = filedialog.askopenfilenames(parent=self.widget, initialdir=start, filetypes=types)
            chosen = " ".join(f'"{p}"' if " " in p else p for p in picked)
            folder = os.path.dirname(picked[0]) if picked else ""
        else:
            chosen = filedialog.askopenfilename(parent=self.widget, initialdir=start, filetypes=types)
            folder = os.path.dirname(chosen) if chosen else ""
        if chosen:
            LAST_DIRS[self.spec.dest] = LAST_DIRS[""] = folder
            self.var.set(chosen)

    # -- values ----------------------------------------------------------------------------
    def text(self) -> str:
        return self.var.get() if self.spec.kind != "bool" else str(self.var.get())

    def value(self):
        """The value the script would get; raises ValueError for a bad entry."""
        if self.spec.kind == "bool":
            return bool_value(self.spec, self.var.get())
        return parse_text(self.spec, self.var.get())

    def current(self):
        """The value for visibility rules: never raises (a bad entry counts as its text)."""
        try:
            return self.value()
        except ValueError:
            return self.var.get()

    def set_value(self, value):
        if self.spec.kind == "bool":
            self.var.set(value is not None and value != self.spec.default and value == bool_value(self.spec, True))
        else:
            self.var.set(value_to_text(self.spec, value))

    def reset(self):
        self.set_value(self.spec.default)

    def is_set(self) -> bool:
        try:
            return not is_default(self.spec, self.value())
        except ValueError:
            return True

    # -- display ---------------------------------------------------------------------------
    def mark(self, problem: str | None):
        self.problem = problem
        kind = self.widget.winfo_class()    # TEntry, TCombobox (choices and suggestions), TCheckbutton
        self.widget.configure(style=f"Error.{kind}" if problem else kind)
        if self.spec.kind != "bool":
            self.help.configure(text=f"⚠ {problem}" if problem else self.short_help(),
                                style="Problem.TLabel" if problem else "Help.TLabel")

    def show(self, visible: bool):
        if visible == self.visible:
            return
        self.visible = visible
        if self.spec.kind == "bool":
            return  # checkboxes are re-flowed by their section
        for w in self.widgets:
            w.grid() if visible else w.grid_remove()

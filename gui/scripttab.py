"""One tab per script: preset bar, the generated form, the exact command, and run buttons."""
from __future__ import annotations

import os
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

from gui import layout, presets, preflight
from gui.forms import Form
from gui.registry import LoadedScript
from gui.runner import display_command, launch_argv
from gui.specs import flag_args

NO_PRESET = "(defaults: choose a preset)"


class ScriptTab(ttk.Frame):
    def __init__(self, master, app, loaded: LoadedScript):
        super().__init__(master, padding=(4, 4))
        self.app, self.loaded, self.entry = app, loaded, loaded.entry
        self.script = self.entry.stem
        self.preset_path: Path | None = None
        self.saved_text: str | None = None     # the preset file's text when loaded/saved
        self.unknown: dict = {}                # keys of a loaded preset this script does not know
        self.preset_name: str | None = None
        self._preview_job = None
        self._build_presetbar()
        self.notes = ttk.Label(self, text="", style="Warn.TLabel", wraplength=int(1100 * app.scale),
                               justify="left")
        self.form = Form(self, loaded.parser, kind=self.entry.kind, on_change=self.changed,
                         help_wrap=int(380 * app.scale))
        self._build_commandbar()   # packed at the bottom before the form: a short window shrinks the form
        self.form.scroll.pack(fill="both", expand=True)
        self.prompts_editor = None
        prompts = self.form.fields.get("sample_prompts")
        if prompts is not None and hasattr(prompts, "buttons"):
            ttk.Button(prompts.buttons, text="Edit…", width=7, command=self.edit_prompts).pack(side="left")
        self.update_preview()

    # -- building --------------------------------------------------------------------------
    def _build_presetbar(self):
        bar = ttk.Frame(self)
        bar.pack(fill="x", pady=(0, 4))
        # packed first so a narrow window clips the preset buttons, not the search box
        self.filter_var = tk.StringVar(self)
        self.filter_entry = ttk.Entry(bar, textvariable=self.filter_var, width=18)
        self.filter_entry.pack(side="right")
        ttk.Label(bar, text="Find option (Ctrl+F):").pack(side="right", padx=(8, 4))
        self.filter_var.trace_add("write", lambda *a: self.form.set_filter(self.filter_var.get()))
        ttk.Label(bar, text="Preset:").pack(side="left")
        self.preset_var = tk.StringVar(self, value=NO_PRESET)
        self.preset_box = ttk.Combobox(bar, textvariable=self.preset_var, state="readonly", width=30)
        self.preset_box.pack(side="left", padx=4)
        self.preset_box.bind("<<ComboboxSelected>>", lambda e: self.load_selected())
        self.save_button = ttk.Button(bar, text="Save", command=self.save, underline=0)
        self.save_button.pack(side="left")
        ttk.Button(bar, text="Save as…", command=self.save_as).pack(side="left", padx=(4, 0))
        ttk.Button(bar, text="Open file…", command=self.open_file).pack(side="left", padx=(4, 0))
        ttk.Button(bar, text="Defaults", command=self.reset).pack(side="left", padx=(4, 0))
        self.refresh_presets()

    def _build_commandbar(self):
        box = ttk.Frame(self)
        box.pack(side="bottom", fill="x", pady=(4, 0))
        row = ttk.Frame(box)
        row.pack(fill="x")
        ttk.Label(row, text="Command:").pack(side="left", anchor="n")
        self.cmd_var = tk.StringVar(self)
        # wrapped over as many lines as it needs (3 at most, then it scrolls); selectable, not editable
        self.cmd_text = tk.Text(row, height=1, wrap="char", font="TkFixedFont", relief="flat", borderwidth=1,
                                highlightthickness=0, padx=4, pady=2, state="disabled", cursor="xterm")
        self.cmd_text.pack(side="left", fill="x", expand=True, padx=4)
        self.cmd_text.bind("<Configure>", lambda e: self._fit_command(), add="+")
        self.cmd_var.trace_add("write", lambda *a: self._show_command())
        ttk.Button(row, text="Copy", command=self.copy_command).pack(side="left", anchor="n")
        self.style_var = tk.StringVar(self, value="config file")
        ttk.Combobox(row, textvariable=self.style_var, values=["config file", "flags"], state="readonly",
                     width=10).pack(side="left", padx=(4, 0))
        self.launcher_var = tk.StringVar(self, value=self.app.launcher)
        ttk.Combobox(row, textvariable=self.launcher_var, values=["python", "accelerate"], state="readonly",
                     width=10).pack(side="left", padx=(4, 0))
        for var in (self.style_var, self.launcher_var):
            var.trace_add("write", lambda *a: self.update_preview())
        actions = ttk.Frame(box)
        actions.pack(fill="x", pady=(4, 0))
        self.start_button = ttk.Button(actions, text="▶ Start (F5)", style="Accent.TButton",
                                       command=lambda: self.app.start_tab(self))
        self.start_button.pack(side="left")
        ttk.Button(actions, text="Check", command=lambda: self.app.check_tab(self)).pack(side="left", padx=4)
        ttk.Button(actions, text="Add to queue", command=lambda: self.app.queue_tab.add_from(self)).pack(side="left")
        if self.log_option():
            ttk.Button(actions, text="TensorBoard", command=lambda: self.app.open_tensorboard(self)).pack(
                side="left", padx=4)
        # packed last: on a narrow window these are clipped, the buttons stay
        self.state_label = ttk.Label(actions, text="", style="Warn.TLabel")
        self.state_label.pack(side="left", padx=(12, 0))
        self.cwd_label = ttk.Label(actions, text="", style="Muted.TLabel")
        self.cwd_label.pack(side="left", padx=(12, 0))

    # -- presets ---------------------------------------------------------------------------
    def refresh_presets(self):
        self.preset_files = presets.list_presets(self.script)
        labels = [f"{p.label} (built-in)" if p.builtin else p.label for p in self.preset_files]
        self.preset_box.configure(values=labels)

    def load_selected(self):
        index = self.preset_box.current()
        if 0 <= index < len(self.preset_files):
            self.load_file(self.preset_files[index].path, keep_paths=True)

    def kept_paths(self, preset_values: dict) -> dict:
        """The form's model, dataset and output paths that a preset or Defaults would clear:
        a preset is settings, the user's files stay."""
        out = {}
        for dest in layout.KEEP_ON_PRESET:
            f = self.form.fields.get(dest)
            if f is not None and dest not in preset_values and f.is_set():
                try:
                    out[dest] = f.value()
                except ValueError:
                    continue
        return out

    def known(self) -> set[str]:
        return {a.dest for a in self.loaded.parser._actions}

    def load_file(self, path, remember: bool = True, keep_paths: bool = False) -> presets.Preset:
        path = Path(path)
        preset = presets.load(path, self.known(), self.script)
        kept = self.kept_paths(preset.values) if keep_paths else {}
        if kept:
            preset.values.update(kept)
            preset.notes.append(f"kept your {', '.join(kept)} (the preset does not set them).")
        self.apply_preset(preset)
        builtin = presets.BUILTIN_DIR in path.parents
        # a built-in preset is a starting point: Save writes a user copy, never the built-in file
        self.preset_path = None if builtin else path
        self.preset_name = preset.name or path.stem
        self.saved_text = self.preset_text() if remember and not builtin else None
        label = next((f"{p.label} (built-in)" if p.builtin else p.label
                      for p in self.preset_files if p.path == path), self.preset_name)
        self.preset_var.set(label)
        self.update_preview()
        return preset

    def apply_preset(self, preset: presets.Preset):
        self.unknown = dict(preset.unknown)
        self.form.set_values(preset.values)
        self.show_notes(preset.notes)

    def show_notes(self, notes: list[str]):
        if notes:
            self.notes.configure(text="\n".join(notes))
            self.notes.pack(fill="x", before=self.form.scroll, pady=(0, 4))
        else:
            self.notes.pack_forget()

    def values(self) -> tuple[dict, dict]:
        return self.form.values()

    def preset_text(self, name: str | None = None) -> str:
        values, _ = self.values()
        return presets.dump(self.script, values, self.form.order(), self.unknown, name or self.preset_name)

    def save(self):
        if self.preset_path is None:
            return self.save_as()
        return self.save_to(self.preset_path)

    def save_to(self, path) -> Path | None:
        values, problems = self.values()
        if problems:
            self.form.mark(problems)
            self.app.show_problems(self, [preflight.Problem(d, m) for d, m in problems.items()],
                                   heading="Fix these values before saving the preset:")
            return None
        path = Path(path)
        self.preset_name = self.preset_name or path.stem
        text = self.preset_text()
        from library.fileio import write_text_atomic

        write_text_atomic(path, text)
        self.preset_path, self.saved_text = path, text
        self.refresh_presets()
        self.preset_var.set(self.preset_name)
        self.update_preview()
        self.app.status(f"saved {path}")
        return path

    def save_as(self):
        folder = presets.user_dir(self.script)
        folder.mkdir(parents=True, exist_ok=True)
        chosen = filedialog.asksaveasfilename(parent=self, initialdir=str(folder), defaultextension=".toml",
                                              filetypes=[("TOML preset", "*.toml")],
                                              initialfile=presets.safe_filename(self.preset_name or "my preset"))
        if chosen:
            # "SD1.5 LoRA quick" has a dot: the name is everything before .toml, and the file
            # always ends in .toml (the dialog adds it only to names without a dot)
            name = chosen[:-5] if chosen.lower().endswith(".toml") else chosen
            self.preset_name = Path(name).name
            return self.save_to(name + ".toml")
        return None

    def open_file(self):
        chosen = filedialog.askopenfilename(parent=self, filetypes=[("Presets", "*.toml *.json"), ("TOML", "*.toml"),
                                                                    ("kohya_ss preset", "*.json"), ("all", "*")])
        if chosen and chosen.lower().endswith(".json"):
            self.app.import_kohya_ss(chosen)       # a kohya_ss preset: File > Import kohya_ss preset
        elif chosen:
            self.load_file(chosen, keep_paths=True)

    def reset(self):
        """Every option back to its default, except the model, dataset and output paths."""
        kept = self.kept_paths({})
        self.unknown = {}
        self.preset_path, self.saved_text, self.preset_name = None, None, None
        self.preset_var.set(NO_PRESET)
        self.form.set_values(kept)
        self.show_notes([f"kept your {', '.join(kept)}; everything else is back to its default."] if kept else [])

    @property
    def dirty(self) -> bool:
        return self.saved_text is None or self.preset_text() != self.saved_text

    # -- command ---------------------------------------------------------------------------
    def run_file(self) -> Path:
        """The file the run reads: the preset itself when it is saved and unchanged."""
        if self.preset_path is not None and not self.dirty:
            return self.preset_path
        return presets.gui_home() / "runs" / f"{self.script}.toml"

    def write_run_file(self, overrides: dict | None = None) -> Path:
        """The file the run reads; `overrides` (e.g. resume for one run) go into it, not into
        the form or the preset."""
        path = presets.gui_home() / "runs" / f"{self.script}.toml" if overrides else self.run_file()
        if path != self.preset_path:
            from library.fileio import write_text_atomic

            values, _ = self.values()
            values.update(overrides or {})
            write_text_atomic(path, presets.dump(self.script, values, self.form.order(), self.unknown,
                                                 self.preset_name))
        return path

    def argv(self, config_path=None, style: str = "config file", overrides: dict | None = None) -> list[str]:
        values, _ = self.values()
        values.update(overrides or {})
        specs = self.form.specs
        if style == "flags":
            args = [w for s in specs if s.dest in values for w in flag_args(s, values[s.dest])]
        else:
            args = ["--config_file", str(config_path or self.run_file())] + preflight.cli_args(specs, values)
        return launch_argv(self.entry.path, args, self.launcher_var.get())

    def command_text(self) -> str:
        return display_command(self.argv(style=self.style_var.get()), self.app.cwd)

    def changed(self):
        # typing fires this per key: update the preview once the burst is over
        if self._preview_job is None:
            self._preview_job = self.after(150, self.update_preview)

    def update_preview(self):
        self._preview_job = None
        self.cmd_var.set(self.command_text())
        self.cwd_label.configure(text=f"in {self.app.cwd}" +
                                 ("" if self.style_var.get() == "flags" else f"  ·  reads {self.run_file()}"))
        self.state_label.configure(text="" if not self.dirty else
                                   ("● unsaved changes" if self.preset_path else "● not saved as a preset"))

    def _show_command(self):
        from gui.theme import palette

        p = palette(self)
        self.cmd_text.configure(state="normal", background=p["text_bg"], foreground=p["fg"])
        self.cmd_text.delete("1.0", "end")
        self.cmd_text.insert("1.0", self.cmd_var.get())
        self.cmd_text.configure(state="disabled")
        self._fit_command()

    def _fit_command(self):
        try:
            lines = self.cmd_text.count("1.0", "end", "displaylines")
        except tk.TclError:
            return
        lines = min(3, max(1, lines[0] if isinstance(lines, tuple) else lines or 1))
        if int(self.cmd_text.cget("height")) != lines:
            self.cmd_text.configure(height=lines)

    def copy_command(self):
        if self.style_var.get() != "flags":
            self.write_run_file()   # so the copied command works when pasted
        self.clipboard_clear()
        self.clipboard_append(self.command_text())
        self.app.status("command copied to the clipboard")

    def cancel_timers(self):
        if self._preview_job is not None:
            self.after_cancel(self._preview_job)
            self._preview_job = None

    # -- for checks and runs ---------------------------------------------------------------
    def snapshot(self, overrides: dict | None = None) -> dict:
        values, problems = self.values()
        values.update(overrides or {})
        return {"parser": self.loaded.parser, "script": self.script, "kind": self.entry.kind,
                "specs": self.form.specs, "values": values,
                "path_kinds": {d: f.path_kind for d, f in self.form.fields.items()},
                "parse_problems": problems, "required": self.form.required}

    def _folder(self, value, values=None) -> Path | None:
        if not value:
            return None
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else Path(self.app.cwd) / p

    def image_folder(self, values: dict | None = None) -> Path | None:
        """Where a run of these values writes images (samples, generated images)."""
        values = self.values()[0] if values is None else values
        for dest, sub in layout.IMAGE_DIRS:
            if values.get(dest):
                return self._folder(values[dest]) / sub if sub else self._folder(values[dest])
        return None

    def prompts_path(self) -> Path:
        """The prompt file to edit: the field's, else one in the output folder, else the GUI's own."""
        values = self.values()[0]
        if values.get("sample_prompts"):
            return self._folder(values["sample_prompts"])
        if values.get("output_dir"):
            return self._folder(values["output_dir"]) / "sample_prompts.txt"
        return presets.gui_home() / "prompts" / f"{self.script}.txt"

    def edit_prompts(self):
        from gui.prompts_editor import PromptsEditor

        if self.prompts_editor is not None and self.prompts_editor.winfo_exists():
            self.prompts_editor.destroy()
        sampler = self.form.fields.get("sample_sampler")
        self.prompts_editor = PromptsEditor(self, self.prompts_path(), on_saved=self._prompts_saved,
                                            samplers=sampler.spec.choices if sampler else None)
        return self.prompts_editor

    def _prompts_saved(self, path: Path):
        self.form.fields["sample_prompts"].var.set(str(path))
        self.app.status(f"saved the sample prompts to {path}")

    def image_option(self) -> str | None:
        """The option naming where this script writes images, if it has one."""
        return next((d for d, _ in layout.IMAGE_DIRS if d in self.form.fields), None)

    def logging_folder(self) -> Path | None:
        values = self.values()[0]
        return next((self._folder(values[d]) for d in layout.LOG_DIRS if values.get(d)), None)

    def log_option(self) -> str | None:
        return next((d for d in layout.LOG_DIRS if d in self.form.fields), None)

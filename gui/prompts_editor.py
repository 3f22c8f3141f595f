"""The sample prompts editor: a text box that writes the `--sample_prompts` file, one prompt per
line with kohya's inline options (`--n` negative prompt, `--w`/`--h` size, `--s` steps, `--l` CFG
scale, `--d` seed, `--ss` sampler), checked by the trainers' own prompt reader before saving."""
from __future__ import annotations

import os
import re
import tempfile
import tkinter as tk
from pathlib import Path
from tkinter import ttk

HELP = ("One prompt per line; # starts a comment. After the prompt, options for that image:\n"
        "--n negative prompt   --w width   --h height   --s steps   --l CFG scale   --d seed   --ss sampler")
EXAMPLE = "a photo of sks dog sitting on a sofa --n blurry, lowres --w 512 --h 512 --s 28 --l 7 --d 1\n"
OPTION_KEYS = [("w", "width"), ("h", "height"), ("s", "steps"), ("l", "CFG"), ("d", "seed"), ("ss", "sampler")]


def set_options(line: str, options: dict[str, str]) -> str:
    """The line with these --key value options set (replacing the line's own, others kept)."""
    for key, value in options.items():
        line = re.sub(rf"\s--{key}\s+\S+", "", " " + line).strip() if f"--{key} " in line + " " else line
        if value != "":
            line = f"{line.rstrip()} --{key} {value}"
    return line


def check_text(text: str, suffix: str = ".txt", default_size=(512, 512)) -> tuple[int, str | None]:
    """(prompt count, problem) as the trainer would read this text."""
    from library.errors import UserError
    from library.prompts import read_prompt_file

    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="sdt-prompts-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        prompts = read_prompt_file(tmp, default_size)
        return len(prompts), None
    except UserError as err:
        return 0, str(err).replace(tmp, "this text")
    finally:
        os.unlink(tmp)


class PromptsEditor(tk.Toplevel):
    def __init__(self, master, path: Path, on_saved=None, samplers: list[str] | None = None):
        super().__init__(master)
        self.path, self.on_saved = Path(path), on_saved
        self.title(f"Sample prompts: {self.path.name}")
        top = master.winfo_toplevel()
        self.geometry(f"+{top.winfo_rootx() + 60}+{top.winfo_rooty() + 60}")
        frame = ttk.Frame(self, padding=10)
        frame.pack(fill="both", expand=True)
        ttk.Label(frame, text=str(self.path), style="Muted.TLabel").pack(anchor="w")
        ttk.Label(frame, text=HELP, justify="left").pack(anchor="w", pady=(4, 6))
        self.text = tk.Text(frame, width=100, height=12, wrap="word", undo=True, font="TkFixedFont")
        self.text.pack(fill="both", expand=True)
        try:
            existing = self.path.read_text(encoding="utf-8-sig") if self.path.is_file() else ""
        except (OSError, UnicodeDecodeError):
            existing = ""
        self.text.insert("1.0", existing or EXAMPLE)
        # per-line options: fill some, then apply them to the line the cursor is on
        row = ttk.Frame(frame)
        row.pack(fill="x", pady=(6, 0))
        ttk.Label(row, text="Options for the current line:").pack(side="left")
        self.option_vars: dict[str, tk.StringVar] = {}
        for key, label in OPTION_KEYS:
            ttk.Label(row, text=label).pack(side="left", padx=(8, 2))
            var = tk.StringVar(self)
            if key == "ss":
                ttk.Combobox(row, textvariable=var, values=[""] + list(samplers or []), width=12,
                             state="readonly").pack(side="left")
            else:
                ttk.Entry(row, textvariable=var, width=6).pack(side="left")
            self.option_vars[key] = var
        ttk.Button(row, text="Apply", command=self.apply_options).pack(side="left", padx=(8, 0))
        bottom = ttk.Frame(frame)
        bottom.pack(fill="x", pady=(8, 0))
        self.status = ttk.Label(bottom, text="", justify="left", wraplength=640)
        self.status.pack(side="left", fill="x", expand=True)
        ttk.Button(bottom, text="Cancel", command=self.destroy).pack(side="right")
        self.save_button = ttk.Button(bottom, text="Save", style="Accent.TButton", command=self.save)
        self.save_button.pack(side="right", padx=4)
        ttk.Button(bottom, text="Check", command=self.check).pack(side="right")
        self.bind("<Escape>", lambda e: self.destroy())
        self.text.focus_set()

    def content(self) -> str:
        return self.text.get("1.0", "end-1c").rstrip("\n") + "\n"

    def apply_options(self):
        line_no = self.text.index("insert").split(".")[0]
        line = self.text.get(f"{line_no}.0", f"{line_no}.end")
        values = {k: v.get().strip() for k, v in self.option_vars.items() if v.get().strip()}
        self.text.delete(f"{line_no}.0", f"{line_no}.end")
        self.text.insert(f"{line_no}.0", set_options(line, values))

    def check(self) -> bool:
        count, problem = check_text(self.content(), self.path.suffix or ".txt")
        self.status.configure(text=f"⚠ {problem}" if problem else f"✔ {count} prompt(s), as the trainer reads them",
                              style="Problem.TLabel" if problem else "TLabel")
        return problem is None

    def save(self) -> Path | None:
        if not self.check():
            return None
        from library.fileio import write_text_atomic

        write_text_atomic(self.path, self.content())
        if self.on_saved:
            self.on_saved(self.path)
        self.destroy()
        return self.path

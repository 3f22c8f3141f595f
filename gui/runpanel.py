"""The bottom of the window: progress bar with step/loss/speed/ETA, Stop, the outcome of the last
run, the live log and the samples pane."""
from __future__ import annotations

import tkinter as tk
from tkinter import ttk

from gui.runner import Progress, parse_progress
from gui.samples import SamplesPane

MAX_LOG_LINES = 5000


def progress_text(p: Progress, final: bool = False) -> str:
    """The header line; `final` (the run is over): no speed or ETA, they are not live any more."""
    parts = [f"{p.desc + ' ' if p.desc else ''}{p.n}/{p.total}"]
    if "loss" in p.postfix:
        parts.append(f"loss {p.postfix['loss']}")
    if "avr_loss" in p.postfix:
        parts.append(f"avg {p.postfix['avr_loss']}")
    if p.rate and not final:
        parts.append(f"{p.rate:.2f} it/s" if p.rate >= 1 else f"{1 / p.rate:.2f} s/it")
    parts.append(f"elapsed {p.elapsed}")
    if p.eta != "?" and not final:
        parts.append(f"ETA {p.eta}")
    return "  ·  ".join(parts)


class RunPanel(ttk.Frame):
    def __init__(self, master, on_stop, scale: float = 1.0, on_request=None):
        super().__init__(master, padding=(6, 4))
        top = ttk.Frame(self)
        top.pack(fill="x")
        self.title = ttk.Label(top, text="No run yet", style="Heading.TLabel")
        self.title.pack(side="left")
        self.stop_button = ttk.Button(top, text="Stop", command=on_stop, state="disabled", underline=0)
        self.stop_button.pack(side="right")
        # asks the running script (a file in its output folder, taken at its next step)
        self.save_now = ttk.Button(top, text="Save now", state="disabled",
                                   command=lambda: on_request and on_request("save"))
        self.sample_now = ttk.Button(top, text="Sample now", state="disabled",
                                     command=lambda: on_request and on_request("sample"))
        self.save_now.pack(side="right", padx=(0, 4))
        self.sample_now.pack(side="right", padx=(0, 4))
        self.stats = ttk.Label(top, text="", style="Muted.TLabel")
        self.stats.pack(side="left", padx=(12, 0))
        self.bar = ttk.Progressbar(self, mode="determinate", maximum=1.0)
        self.bar.pack(fill="x", pady=(4, 2))
        self.outcome_row = ttk.Frame(self)
        self.outcome = ttk.Label(self.outcome_row, text="", justify="left", wraplength=int(1000 * scale))
        self.outcome.pack(side="left", fill="x", expand=True)
        self.resume_button = ttk.Button(self.outcome_row, text="Resume from the saved state")
        panes = ttk.PanedWindow(self, orient="horizontal")
        panes.pack(fill="both", expand=True, pady=(4, 0))
        self.panes = panes
        logf = ttk.Frame(panes)
        self.log = tk.Text(logf, height=6, wrap="none", font="TkFixedFont", state="disabled", relief="flat",
                           undo=False)
        ys = ttk.Scrollbar(logf, orient="vertical", command=self._scroll)
        xs = ttk.Scrollbar(logf, orient="horizontal", command=self.log.xview)
        self.log.configure(yscrollcommand=ys.set, xscrollcommand=xs.set)
        self.live = ttk.Label(logf, text="", font="TkFixedFont", style="Muted.TLabel")
        self.log.grid(row=0, column=0, sticky="nsew")
        ys.grid(row=0, column=1, sticky="ns")
        xs.grid(row=1, column=0, sticky="ew")
        self.live.grid(row=2, column=0, columnspan=2, sticky="w")
        logf.rowconfigure(0, weight=1)
        logf.columnconfigure(0, weight=1)
        self.samples = SamplesPane(panes, scale=scale)
        panes.add(logf, weight=3)
        panes.add(self.samples, weight=1)
        self._progress: Progress | None = None
        self.follow = True   # keep showing the newest line until the user scrolls up
        for seq in ("<MouseWheel>", "<Button-4>", "<Button-5>", "<KeyRelease>"):
            self.log.bind(seq, lambda e: self.after_idle(self._update_follow), add="+")
        self.restyle()

    def _scroll(self, *args):
        self.log.yview(*args)
        self._update_follow()

    def _update_follow(self):
        self.follow = self.log.yview()[1] >= 0.999

    def restyle(self):
        from gui.theme import palette

        p = palette(self)
        self.log.configure(background=p["text_bg"], foreground=p["fg"], insertbackground=p["fg"])
        self.log.tag_configure("error", foreground=p["error_fg"])
        self.log.tag_configure("warn", foreground=p["warn"])
        self.log.tag_configure("gui", foreground=p["accent"])

    # -- a run -----------------------------------------------------------------------------
    def begin(self, title: str):
        self.title.configure(text=title)
        self.bar.configure(value=0.0, mode="indeterminate")
        self.bar.start(80)
        self.stats.configure(text="starting…")
        self.outcome.configure(text="", style="TLabel")
        self.outcome_row.pack_forget()
        self.resume_button.pack_forget()
        self.live.configure(text="")
        self.stop_button.configure(state="normal", text="Stop")
        self._progress = None

    def allow_requests(self, save: bool, sample: bool):
        """Save now / Sample now for this run (a trainer with an output folder; samples need prompts)."""
        self.save_now.configure(state="normal" if save else "disabled")
        self.sample_now.configure(state="normal" if sample else "disabled")

    def append(self, line: str, tag: str | None = None):
        if tag is None:
            low = line.lstrip().lower()
            if low.startswith(("error", "traceback")) or " error:" in low[:40]:
                tag = "error"
            elif low.startswith("warning"):
                tag = "warn"
        self.log.configure(state="normal")
        self.log.insert("end", line + "\n", (tag,) if tag else ())
        lines = int(self.log.index("end-1c").split(".")[0])
        if lines > MAX_LOG_LINES:
            self.log.delete("1.0", f"{lines - MAX_LOG_LINES}.0")
        self.log.configure(state="disabled")
        if self.follow:
            self.log.see("end")

    def set_live(self, text: str):
        progress = parse_progress(text)
        if progress is None:
            self.live.configure(text=text[-200:])
            return
        self.live.configure(text="")
        self.show_progress(progress)

    def show_progress(self, p: Progress):
        self._progress = p
        if str(self.bar.cget("mode")) != "determinate":
            self.bar.stop()
            self.bar.configure(mode="determinate")
        self.bar.configure(value=p.fraction)
        self.stats.configure(text=progress_text(p))

    @property
    def progress(self) -> Progress | None:
        return self._progress

    def stopping(self):
        self.stop_button.configure(text="Kill now")
        self.stats.configure(text="stopping: the script finishes its step and saves its state… "
                                  "(click Kill now to end it at once)")

    def finish(self, outcome: str, returncode: int, detail: str = ""):
        self.bar.stop()
        if str(self.bar.cget("mode")) != "determinate":
            self.bar.configure(mode="determinate", value=0.0)
        if outcome == "finished":
            self.bar.configure(value=1.0)
        self.stop_button.configure(state="disabled", text="Stop")
        self.allow_requests(False, False)
        p = self._progress
        if p is not None and outcome == "finished" and p.total:
            p.n = p.total    # tqdm's last refresh may be a step behind the end
        self.stats.configure(text=progress_text(p, final=True) if p else "")
        heads = {"finished": ("✔ Finished", "Ok.TLabel"),
                 "stopped": ("■ Stopped", "Stopped.TLabel"),
                 "failed": (f"✖ Failed (exit code {returncode})", "Error.TLabel")}
        head, style = heads.get(outcome, (outcome, "TLabel"))
        sep = "\n" if outcome == "failed" else " — "    # an error paragraph gets its own lines
        self.outcome.configure(text=head + (f"{sep}{detail}" if detail else ""), style=style)
        self.outcome_row.pack(anchor="w", fill="x", before=self.panes)

    def offer_resume(self, command):
        """After a stop with a saved state: one click continues the run from it."""
        self.resume_button.configure(command=command)
        self.resume_button.pack(side="right")

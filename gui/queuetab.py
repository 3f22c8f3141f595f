"""The Queue tab: presets that run one after another, reorderable, stop- or continue-on-error."""
from __future__ import annotations

import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

from gui import presets
from gui.preflight import Problem
from gui.runqueue import FAILED, FINISHED, RUNNING, STOPPED, RunQueue

ITEM_GAP_MS = 1000
STATUS_TEXT = {"pending": "waiting", RUNNING: "▶ running", FINISHED: "✔ finished", FAILED: "✖ failed",
               STOPPED: "■ stopped"}


class QueueTab(ttk.Frame):
    def __init__(self, master, app):
        super().__init__(master, padding=8)
        self.app = app
        self.queue = RunQueue(presets.gui_home() / "queue")
        self.running = False
        ttk.Label(self, text="Runs queued here start one after another. Add the current form with "
                             "“Add to queue” on a training or tool tab, or add saved preset files.",
                  style="Muted.TLabel").pack(anchor="w")
        body = ttk.Frame(self)
        body.pack(fill="both", expand=True, pady=6)
        self.tree = ttk.Treeview(body, columns=("script", "name", "status"), show="headings", selectmode="browse",
                                 height=12)
        for col, title, width in (("script", "Script", 150), ("name", "Preset", 240), ("status", "Status", 560)):
            self.tree.heading(col, text=title)
            self.tree.column(col, width=int(width * app.scale), anchor="w", stretch=col == "status")
        self.tree.pack(side="left", fill="both", expand=True)
        side = ttk.Frame(body, padding=(8, 0))
        side.pack(side="left", fill="y")
        buttons = [("Add preset file…", self.add_file_dialog), ("Move up (Ctrl+↑)", lambda: self.move(-1)),
                   ("Move down (Ctrl+↓)", lambda: self.move(1)), ("Remove (Del)", self.remove),
                   ("Run again", self.requeue), ("Clear finished", self.clear_done)]
        for text, command in buttons:
            ttk.Button(side, text=text, command=command).pack(fill="x", pady=2)
        self.continue_var = tk.BooleanVar(self, value=self.queue.continue_on_error)
        ttk.Checkbutton(self, text="Continue with the next run when one fails (otherwise the queue stops)",
                        variable=self.continue_var, command=self._set_continue).pack(anchor="w")
        controls = ttk.Frame(self)
        controls.pack(fill="x", pady=(6, 0))
        self.run_button = ttk.Button(controls, text="▶ Run queue", style="Accent.TButton", command=self.start)
        self.run_button.pack(side="left")
        self.stop_button = ttk.Button(controls, text="Stop queue", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=6)
        self.status = ttk.Label(controls, text="", style="Muted.TLabel")
        self.status.pack(side="left", padx=8)
        self.tree.bind("<Control-Up>", lambda e: (self.move(-1), "break")[1])
        self.tree.bind("<Control-Down>", lambda e: (self.move(1), "break")[1])
        self.tree.bind("<Delete>", lambda e: self.remove())
        self.refresh()

    # -- list ------------------------------------------------------------------------------
    def refresh(self):
        selected = self.selected_index()
        self.tree.delete(*self.tree.get_children())
        for item in self.queue.items:
            status = STATUS_TEXT.get(item.status, item.status)
            if item.status == FAILED and item.returncode is not None:
                status += f" (exit {item.returncode})"
            if item.detail:
                status += f": {item.detail.splitlines()[0][:120]}"
            self.tree.insert("", "end", iid=str(item.id), values=(item.script, item.name, status))
        if selected is not None and self.queue.items:
            self.select(min(selected, len(self.queue.items) - 1))

    def selected_index(self) -> int | None:
        sel = self.tree.selection()
        if not sel:
            return None
        ids = [str(i.id) for i in self.queue.items]
        return ids.index(sel[0]) if sel[0] in ids else None

    def select(self, index: int):
        iid = str(self.queue.items[index].id)
        self.tree.selection_set(iid)
        self.tree.focus(iid)
        self.tree.see(iid)

    def add_from(self, tab):
        values, problems = tab.values()
        if problems:
            tab.form.mark(problems)
            self.app.show_problems(tab, [Problem(d, m) for d, m in problems.items()],
                                   heading="Fix these values before queueing:")
            return None
        name = tab.preset_name or f"{tab.entry.tab} form"
        item = self.queue.add(tab.script, name, text=tab.preset_text())
        self.refresh()
        self.app.status(f"queued “{name}” ({len(self.queue.items)} in the queue)")
        return item

    def add_file(self, path, script: str | None = None):
        path = Path(path)
        if script is None:
            script = presets.parse(path.read_text(encoding="utf-8"), set()).script or "train_network"
        item = self.queue.add(script, presets.preset_name(path), source=path)
        self.refresh()
        return item

    def add_file_dialog(self):
        chosen = filedialog.askopenfilename(parent=self, filetypes=[("TOML preset", "*.toml")])
        if chosen:
            self.add_file(chosen)

    def move(self, delta: int):
        index = self.selected_index()
        if index is not None:
            new = self.queue.move(index, delta)
            self.refresh()
            self.select(new)

    def remove(self):
        index = self.selected_index()
        if index is not None and self.queue.items[index].status != RUNNING:
            self.queue.remove(index)
            self.refresh()

    def requeue(self):
        index = self.selected_index()
        if index is not None and self.queue.items[index].status != RUNNING:
            self.queue.requeue(index)
            self.refresh()

    def clear_done(self):
        self.queue.clear_done()
        self.refresh()

    def _set_continue(self):
        self.queue.continue_on_error = self.continue_var.get()
        self.queue.save()

    # -- running ---------------------------------------------------------------------------
    def start(self):
        if self.app.busy():
            self.status.configure(text="another run is active; the queue starts when you Run it again")
            return
        self.running = True
        self.run_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.next()

    def next(self):
        item = self.queue.next_pending()
        if not self.running or item is None:
            self.finish("queue done" if item is None else "queue stopped")
            return
        self.queue.mark(item, RUNNING)
        self.refresh()
        self.status.configure(text=f"running “{item.name}”")
        if not self.app.start_queue_item(item, on_done=lambda outcome, rc, detail: self.item_done(item, outcome,
                                                                                                     rc, detail)):
            self.queue.mark(item, FAILED, None, "its script is not available")
            self.refresh()
            self.after(ITEM_GAP_MS, self.next) if self.queue.continue_on_error else self.finish("queue stopped")

    def item_done(self, item, outcome: str, rc: int, detail: str):
        status = {"finished": FINISHED, "stopped": STOPPED}.get(outcome, FAILED)
        self.queue.mark(item, status, rc, detail if status == FAILED else "")
        self.refresh()
        if status == STOPPED or status == FAILED and not self.queue.continue_on_error:
            self.finish("queue stopped" + (" after a failure" if status == FAILED else ""))
        else:
            # a short pause: the outcome stays readable and the finished run frees its memory
            self._next_job = self.after(ITEM_GAP_MS, self.next)

    def stop(self):
        self.running = False
        self.app.stop_run()

    def finish(self, text: str):
        self.running = False
        self.run_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        self.status.configure(text=text)

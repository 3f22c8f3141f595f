"""Checking and running scripts for the main window (a mixin of App): the preflight in a worker
thread, one run at a time, its events drained into the run panel, Stop, Resume, TensorBoard.
Tk is only touched from the Tk thread: workers report through `self.results`, runs through
their own event queues, both drained by `_poll`."""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

from gui import preflight, presets
from gui.runner import Run, display_command, launch_argv
from gui.widgets import Dialog

if TYPE_CHECKING:
    from gui.scripttab import ScriptTab

POLL_MS = 50


class RunControl:
    def in_thread(self, func, callback):
        """Run `func` in a worker thread; `callback(result)` runs later on the Tk thread."""
        def work():
            try:
                result = func()
            except Exception as err:  # shown to the user, never swallowed
                result = preflight.Result([preflight.Problem(None, f"check failed: {err!r}")])
            self.results.put((callback, result))
        threading.Thread(target=work, daemon=True).start()

    def show_problems(self, tab, problems, heading="These problems must be fixed before the run:"):
        tab.form.mark(preflight.problems_by_field(problems))
        lines = []
        for p in problems:
            where = f"{p.dest}: " if p.dest else ""
            lines.append(f"• {where}{p.message}")
        dialog = Dialog(self.root, "Cannot start", heading, "\n".join(lines), kind="error")
        self.dialogs.append(dialog)
        return dialog

    # -- checking and starting -------------------------------------------------------------
    def check_tab(self, tab: ScriptTab, then=None, overrides: dict | None = None):
        self.status(f"checking {tab.entry.tab}… (the dataset check opens every image once)")
        tab.start_button.configure(state="disabled")
        snap = tab.snapshot(overrides)
        self.in_thread(lambda: preflight.check(snap, self.cwd), lambda result: self._checked(tab, result, then))

    def _checked(self, tab: ScriptTab, result: preflight.Result, then):
        tab.start_button.configure(state="normal")
        self.last_check = result
        if result.dataset is not None and self.dataset_tab.target_tab() is tab:
            self.dataset_tab.show_report(result.dataset)
        if not result.ok:
            self.status(f"{len(result.problems)} problem(s) found")
            self.show_problems(tab, result.problems)
            return
        tab.form.mark({})
        plan = f": {result.dataset.steps_per_epoch} steps per epoch; {result.dataset.plan}" if result.dataset else ""
        self.status(f"no problems found{plan}")
        if then:
            then(result)

    def start_current(self):
        tab = self.current_tab()
        if tab is not None:
            self.start_tab(tab)
        return "break"

    def start_tab(self, tab: ScriptTab, overrides: dict | None = None):
        """Check, then run the tab's form; `overrides` apply to this run only (Resume)."""
        if self.busy():
            self.status("a run is active: stop it first, or add this one to the queue")
            return
        self.check_tab(tab, then=lambda result: self._launch_tab(tab, result, overrides), overrides=overrides)

    def _launch_tab(self, tab: ScriptTab, result, overrides: dict | None = None):
        if self.busy():
            return
        path = tab.write_run_file(overrides)
        argv = tab.argv(config_path=path, overrides=overrides)
        values = {**tab.values()[0], **(overrides or {})}
        self._begin(argv, f"{tab.entry.tab}: {tab.preset_name or 'current form'}", tab, values=values)
        if overrides and overrides.get("resume"):
            self.run_panel.append(f"[gui] resuming from {overrides['resume']} (this run only; the form and "
                                  "preset keep resume empty)", "gui")
        if result.dataset is not None:
            self.run_panel.append(f"[gui] dataset: {result.dataset.steps_per_epoch} steps per epoch; "
                                  f"{result.dataset.plan}", "gui")

    def start_queue_item(self, item, on_done) -> bool:
        def find():
            return next((t for t in self.tabs.values() if t.script == item.script), None)

        tab = find()
        if tab is None:            # a tool's tab is built on first use
            self.load_all_tools()
            tab = find()
        if tab is None or self.busy():
            return False
        values = presets.load(item.path, tab.known(), tab.script).values
        args = ["--config_file", item.path] + preflight.cli_args(tab.form.specs, values)
        argv = launch_argv(tab.entry.path, args, tab.launcher_var.get())
        self._begin(argv, f"Queue: {item.name}", tab, values=values, on_done=on_done)
        return True

    def _begin(self, argv, title, tab, values=None, on_done=None):
        self.run_panel.begin(title)
        self.run_panel.append(f"[gui] {display_command(argv, self.cwd)}", "gui")
        self.run_tab, self.run_done = tab, on_done
        try:
            self.run = Run(argv, cwd=self.cwd, stop_grace=self.stop_grace).start()
        except OSError as err:   # e.g. the working folder is gone: a failed run, shown as such
            self.run = None
            self.run_panel.finish("failed", -1, f"could not start {argv[0]}: {err}")
            done, self.run_done = self.run_done, None
            if done:
                self.root.after_idle(lambda: done("failed", -1, str(err)))
            return
        self.run_panel.samples.watch(tab.image_folder(values), since=self.run.started_at - 1)
        values = tab.values()[0] if values is None else values
        trains = tab.entry.kind == "train" and bool(values.get("output_dir"))
        self.run_output = tab._folder(values.get("output_dir")) if trains else None
        self.run_panel.allow_requests(trains, trains and bool(values.get("sample_prompts")))
        self.status(f"running (process group {self.run.pgid})")

    def request_now(self, what: str):
        """Save now / Sample now: the running script takes the request at its next step."""
        from library.training import live_requests

        if not self.busy() or self.run_output is None:
            return
        live_requests.request(self.run_output, what)
        self.run_panel.append(f"[gui] asked the run to {what} at its next step", "gui")
        self.status(f"asked the run to {what} at its next step")

    def resume(self, tab: ScriptTab, state_path: str):
        """Continue a stopped run: the same form, resumed from its saved state. The state path
        goes into this run's file only: a later Save or Start must not silently resume it again."""
        self.notebook.select(tab) if tab.entry.kind == "train" else None
        self.start_tab(tab, overrides={"resume": state_path})

    def stop_run(self):
        if not self.busy():
            return "break"
        if self.run.stop_requested:
            self.run.kill()
        else:
            self.run.stop()
            self.run_panel.stopping()
        return "break"

    # -- events ----------------------------------------------------------------------------
    def _poll(self):
        self._poll_id = None
        try:
            self._drain()
        finally:
            if not self._destroyed:
                self._poll_id = self.root.after(POLL_MS, self._poll)

    def _drain(self):
        while not self.results.empty():
            callback, result = self.results.get_nowait()
            callback(result)
        run = self.run
        if run is None:
            return
        live = {}
        for _ in range(2000):   # bounded, so a chatty run cannot freeze the window
            try:
                kind, a, b = run.events.get_nowait()
            except queue.Empty:
                break
            if kind == "line":
                self.run_panel.append(b)
            elif kind == "live":
                live[a] = b
            elif kind == "exit":
                for text in live.values():
                    self.run_panel.set_live(text)
                live = {}
                self._finished(run)
                break
        for text in live.values():
            self.run_panel.set_live(text)

    def _finished(self, run: Run):
        outcome = run.outcome()
        detail = ""
        if outcome == "failed":
            detail = run.error_text()
        elif outcome == "stopped" and run.resume_path:
            detail = f"state saved in {run.resume_path}"
        self.run_panel.finish(outcome, run.returncode, detail)
        tab = self.run_tab
        if outcome == "stopped" and run.resume_path and tab is not None and "resume" in tab.form.fields \
                and self.run_done is None:
            self.run_panel.offer_resume(lambda: self.resume(tab, run.resume_path))
        self.run_panel.samples.stop()
        if self.run_output is not None:     # a request the run did not reach must not hit the next run
            from library.training import live_requests

            live_requests.take(self.run_output)
            self.run_output = None
        self.status(f"{outcome} (exit code {run.returncode})")
        done, self.run_done = self.run_done, None
        if done:
            done(outcome, run.returncode, detail)
        if self._closing:
            self._destroy()

    # -- TensorBoard -----------------------------------------------------------------------
    def open_tensorboard(self, tab: ScriptTab):
        folder = tab.logging_folder()
        if folder is None:
            option = tab.log_option()
            self.dialogs.append(Dialog(self.root, "TensorBoard", f"Set {option} first",
                                       f"TensorBoard shows the logs a run writes to {option}. Set it in the "
                                       "form (find it with Ctrl+F).", kind="warning"))
            return None
        url = self.tensorboard.open(folder)
        self.status(f"TensorBoard on {folder} at {url} (it stops when the GUI closes)")
        return url

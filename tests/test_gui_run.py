"""Runs from the real window: a short training of the tiny model with live progress and
samples, Stop (state saved, process group gone), TensorBoard. (A failing run: test_gui_queue.)"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gui_fixtures import app, gui_display, gui_home, make_app, screenshot, wait_until  # noqa: F401
from tests.helpers import write_image_folder

pytestmark = pytest.mark.gui
REPO = Path(__file__).resolve().parents[1]


def fill(app, tiny_model, tmp_path, **extra):
    """A tiny-model training in paths with spaces and non-ASCII letters."""
    data = tmp_path / "my dätä"
    write_image_folder(data, "5_sks disk", count=3, size=64)
    prompts = tmp_path / "prompts ü.txt"
    prompts.write_text("a sks disk --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    values = {"pretrained_model_name_or_path": str(tiny_model.single_file), "train_data_dir": str(data),
              "output_dir": str(tmp_path / "out dir ü"), "resolution": "64", "caption_extension": ".txt",
              "learning_rate": 0.001, "seed": 1, "max_train_steps": 100000, "network_dim": 2,
              "max_data_loader_n_workers": 0, "sample_prompts": str(prompts), "sample_every_n_steps": 2,
              "sample_sampler": "euler"}
    values.update(extra)
    tab = app.tabs["train_network"]
    tab.form.set_values(values)
    return tab


def pump_timed(app, cond, timeout):
    """wait_until that also records the longest event-loop turn (the GUI must stay responsive)."""
    worst, end = 0.0, time.monotonic() + timeout
    while time.monotonic() < end:
        t = time.monotonic()
        app.root.update()
        worst = max(worst, time.monotonic() - t)
        if cond():
            return True, worst
        time.sleep(0.02)
    return False, worst


def test_start_progress_samples_stop(app, tiny_model, tmp_path):
    tab = fill(app, tiny_model, tmp_path)
    tab.start_button.invoke()
    assert wait_until(app.root, lambda: app.run is not None, timeout=30), app.statusbar.cget("text")
    run = app.run
    ok, worst = pump_timed(app, lambda: (app.run_panel.progress or 0) and app.run_panel.progress.n >= 3, 120)
    assert ok, app.run_panel.log.get("1.0", "end")[-2000:]
    assert worst < 0.5, f"the window froze for {worst:.2f} s"
    p = app.run_panel.progress
    assert p.total == 100000 and "loss" in p.postfix and p.rate
    stats = app.run_panel.stats.cget("text")
    assert "loss" in stats and "it/s" in stats and "ETA" in stats
    assert 0 < float(app.run_panel.bar.cget("value")) < 1
    assert "Dataset 1 of 1" in app.run_panel.log.get("1.0", "end")     # the log streams live
    assert wait_until(app.root, lambda: app.run_panel.samples.shown, timeout=60)   # samples appear
    assert app.run_panel.samples.shown[0].parent.name == "sample"
    screenshot(app.root, "run-progress")

    pgid = run.pgid
    app.run_panel.stop_button.invoke()
    assert app.run_panel.stop_button.cget("text") == "Kill now"
    assert wait_until(app.root, lambda: app.run_panel.outcome.cget("text"), timeout=90)
    assert run.outcome() == "stopped" and run.returncode == 130
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)      # the whole process group is gone
    state = tmp_path / "out dir ü" / "last-interrupted-state"
    assert (state / "train_state.json").is_file()
    assert run.resume_path and os.path.samefile(run.resume_path, state)
    outcome = app.run_panel.outcome.cget("text")
    assert outcome.startswith("■ Stopped") and "state saved in" in outcome
    screenshot(app.root, "run-stopped")
    # one click continues from the saved state: that run resumes, the form keeps resume empty
    assert app.run_panel.resume_button.winfo_manager()
    started = []
    app.start_tab = lambda t, overrides=None: started.append((t, overrides))
    app.run_panel.resume_button.invoke()
    assert started[0][0] is tab and os.path.samefile(started[0][1]["resume"], state)
    assert "resume" not in tab.values()[0]


def test_tensorboard_button_starts_on_a_free_port_and_stops_on_exit(make_app, tmp_path, monkeypatch):
    from gui.tensorboard import TensorBoard

    real = TensorBoard().command(tmp_path / "logs", 6123)
    assert real[1:3] == ["-m", "tensorboard.main"] and real[real.index("--logdir") + 1] == str(tmp_path / "logs")
    # a stand-in server that starts fast: the button's job is the port, the browser and the cleanup
    monkeypatch.setattr(TensorBoard, "command", lambda self, logdir, port: [
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(logdir)])
    app = make_app()
    opened = []
    app.tensorboard.opener = opened.append
    tab = app.tabs["train_network"]
    tab.form.set_values({"logging_dir": str(tmp_path / "tb logs")})
    url = app.open_tensorboard(tab)
    assert wait_until(app.root, lambda: opened, timeout=20) and opened == [url]
    pgid = app.tensorboard.pgid
    os.killpg(pgid, 0)
    app.on_close()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


FAKE_TRAINER = r"""
import signal, sys, time
def stop(*_):
    print("stop requested: saving the state", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
for i in range(1, 100000):
    print(f"\rsteps:  0%|          | {i}/100000 [00:01<05:00,  9.50it/s, loss=0.5{i % 10}]", end="",
          file=sys.stderr, flush=True)
    time.sleep(0.05)
"""


def test_closing_the_window_stops_the_run_first(make_app):
    import tkinter as tk

    app = make_app()
    app._begin([sys.executable, "-c", FAKE_TRAINER], "fake run", app.tabs["train_network"])
    assert wait_until(app.root, lambda: app.run_panel.progress and app.run_panel.progress.n >= 2, timeout=20)
    assert app.run_panel.progress.postfix["loss"].startswith("0.5")
    pgid = app.run.pgid
    app.on_close()                       # a run is active: it is stopped politely first
    assert not app._destroyed and app.run.stop_requested
    end = time.monotonic() + 20
    while not app._destroyed and time.monotonic() < end:
        try:
            app.root.update()
        except tk.TclError:
            break
        time.sleep(0.02)
    assert app._destroyed and app.run.returncode == 130
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@pytest.mark.skipif(not shutil.which("xdotool"), reason="needs xdotool")
def test_python_m_gui_starts_and_quits_with_the_keyboard(gui_display, tmp_path):
    """The real entry point in its own process, driven by X key events: Ctrl+Q saves the session."""
    home = tmp_path / "home"
    env = {**os.environ, "DISPLAY": gui_display}
    proc = subprocess.Popen([sys.executable, "-m", "gui", "--home", str(home), "--theme", "light"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        found = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "^sd-trainers$"],
                               env=env, capture_output=True, text=True, timeout=60)
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, timeout=10)
        subprocess.run(["xdotool", "key", "--window", window, "ctrl+q"], env=env, timeout=10)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert (home / "session.json").is_file() and (home / "last" / "train_network.toml").is_file()


def test_a_tool_runs_from_the_tools_tab_with_its_positional_argument(app, tmp_path):
    """check_lora_weights takes the file as a positional argument: it goes on the command line
    (a config file cannot give positionals), the rest in the preset."""
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = tmp_path / "my lora ü.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 8), f"{key}.lora_up.weight": torch.randn(8, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(lora))
    app.notebook.select(app.tools_page)
    holder = next(h for h in app.tools_notebook.tabs() if app.tools_notebook.tab(h, "text") == "Check LoRA")
    app.tools_notebook.select(holder)
    app.root.update()
    tab = app.current_tab()
    assert tab is not None and tab.script == "check_lora_weights"
    tab.form.set_values({"file": [str(lora)]})
    # the positional is on the command line (relative to the working folder, quoted)
    assert wait_until(app.root, lambda: tab.cmd_var.get().endswith("'my lora ü.safetensors'"), timeout=5), \
        tab.cmd_var.get()
    app.start_current()
    assert wait_until(app.root, lambda: app.run is not None and app.run_panel.outcome.cget("text"), timeout=60)
    assert app.run.outcome() == "finished", app.run_panel.log.get("1.0", "end")
    assert "1 modules (0 text encoder, 1 U-Net)" in app.run_panel.log.get("1.0", "end")
    screenshot(app.root, "tool-check-lora-finished")


def test_sample_now_and_save_now_take_effect_in_a_running_training(app, tiny_model, tmp_path):
    """The buttons leave a request in the output folder; the script honours it at its next step."""
    tab = fill(app, tiny_model, tmp_path, sample_every_n_steps=None)     # no scheduled samples or saves
    out = tmp_path / "out dir ü"
    tab.start_button.invoke()
    assert wait_until(app.root, lambda: app.run is not None, timeout=30), app.statusbar.cget("text")
    panel = app.run_panel
    assert str(panel.save_now.cget("state")) == "normal" and str(panel.sample_now.cget("state")) == "normal"
    assert wait_until(app.root, lambda: panel.progress and panel.progress.n >= 2, timeout=120), \
        panel.log.get("1.0", "end")[-2000:]
    assert not list((out / "sample").glob("*.png")) and not list(out.glob("*-step*.safetensors"))
    panel.sample_now.invoke()
    panel.save_now.invoke()
    assert wait_until(app.root, lambda: list(out.glob("*-step*.safetensors")), timeout=60), \
        panel.log.get("1.0", "end")[-2000:]
    assert wait_until(app.root, lambda: list((out / "sample").glob("*.png")), timeout=120)
    log = panel.log.get("1.0", "end")
    assert "save now (requested): saving at step" in log and "sample now (requested): sampling at step" in log
    assert not list(out.glob(".*-now"))                  # taken once
    screenshot(app.root, "run-sample-save-now")
    panel.stop_button.invoke()
    assert wait_until(app.root, lambda: panel.outcome.cget("text"), timeout=90)   # the run's end was handled
    assert str(panel.save_now.cget("state")) == "disabled"

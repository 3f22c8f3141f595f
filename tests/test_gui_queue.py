"""The queue in the real window: presets run one after another in the order shown, a failing run
shows its error, continue-on-error and stop-on-error."""
from __future__ import annotations

import pytest

from gui.runqueue import FAILED
from tests.gui_fixtures import app, gui_display, gui_home, make_app, screenshot, wait_until  # noqa: F401
from tests.test_gui_run import fill

pytestmark = pytest.mark.gui


def statuses(app):
    return [i.status for i in app.queue_tab.queue.items]


def test_queue_runs_presets_in_order_and_shows_a_failure(app, tiny_model, tmp_path, monkeypatch):
    """Train a LoRA, then check the file it wrote (which only works in this order), with a broken
    preset between them and continue-on-error."""
    monkeypatch.setattr("gui.queuetab.ITEM_GAP_MS", 50)
    qt = app.queue_tab
    lora = tmp_path / "A" / "last.safetensors"
    checker = next(t for t in app.load_all_tools() if t.script == "check_lora_weights")
    checker.form.set_values({"file": [str(lora)]})
    checker.preset_name = "check it"
    qt.add_from(checker)
    tab = fill(app, tiny_model, tmp_path, max_train_steps=1, sample_prompts=None, output_dir=str(tmp_path / "A"))
    tab.preset_name = "train"
    qt.add_from(tab)
    # a preset file edited by hand with a value the script rejects (it fails at once)
    broken = tmp_path / "broken.toml"
    broken.write_text(tab.preset_text("broken").replace("network_dim = 2", "network_dim = 0"), encoding="utf-8")
    qt.add_file(broken)
    assert [i.name for i in qt.queue.items] == ["check it", "train", "broken"]
    # reorder with the keyboard: Ctrl+Down on the selected row moves "check it" to the end
    app.notebook.select(qt)
    qt.select(0)
    qt.tree.focus_force()
    app.root.update()
    for _ in range(2):
        qt.tree.event_generate("<Control-Down>")
        app.root.update()
    assert [i.name for i in qt.queue.items] == ["train", "broken", "check it"]
    qt.continue_var.set(True)
    qt._set_continue()

    shown = []      # what the outcome banner said at the end of each run
    finish = app.run_panel.finish

    def recording_finish(*a, **kw):
        finish(*a, **kw)
        shown.append(app.run_panel.outcome.cget("text"))

    app.run_panel.finish = recording_finish
    qt.run_button.invoke()
    assert wait_until(app.root, lambda: qt.queue.items[1].status == FAILED, timeout=120), statuses(app)
    outcome = shown[1]      # the failing run's error, in the window
    assert outcome.startswith("✖ Failed (exit code 2)") and "network_dim" in outcome, outcome
    assert "error:" in qt.queue.items[1].detail and app.run_panel.log.tag_ranges("error")
    assert "failed (exit 2)" in qt.tree.item(str(qt.queue.items[1].id), "values")[2]
    if app.run_panel.outcome.cget("text") == outcome:   # (the next run may have started already)
        screenshot(app.root, "run-failed-in-queue")
    assert wait_until(app.root, lambda: not qt.running, timeout=120), statuses(app)
    assert statuses(app) == ["finished", "failed", "finished"]
    assert shown[2].startswith("✔ Finished")
    assert f"{lora}" in app.run_panel.log.get("1.0", "end") and "ranks 2" in app.run_panel.log.get("1.0", "end")
    screenshot(app.root, "queue-done")


def test_queue_stops_at_a_failure_unless_told_to_continue(app, monkeypatch):
    """The decisions only: runs are simulated, each ends as the item's name says."""
    qt = app.queue_tab
    for name in ("ok 1", "fails", "ok 2"):
        qt.queue.add("train_network", name, text="")
    started = []

    def fake_start(item, on_done):
        started.append(item.name)
        app.root.after(10, lambda: on_done("failed" if item.name == "fails" else "finished", 2, "error: x"))
        return True

    monkeypatch.setattr(app, "start_queue_item", fake_start)
    monkeypatch.setattr("gui.queuetab.ITEM_GAP_MS", 10)
    qt.run_button.invoke()
    assert wait_until(app.root, lambda: not qt.running, timeout=10)
    assert started == ["ok 1", "fails"] and statuses(app) == ["finished", "failed", "pending"]
    assert "after a failure" in qt.status.cget("text")
    qt.continue_var.set(True)
    qt._set_continue()
    qt.select(1)
    qt.requeue()
    qt.run_button.invoke()
    assert wait_until(app.root, lambda: not qt.running, timeout=10)
    assert started == ["ok 1", "fails", "fails", "ok 2"] and statuses(app) == ["finished", "failed", "finished"]

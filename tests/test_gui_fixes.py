"""Issue 20's GUI bugs, each reproduced in the real window under Xvfb (bugs 1-2 need no
window: test_gui_logic.py)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gui import presets
from tests.gui_fixtures import (app, choose, gui_display, gui_home, make_app, paste_text,  # noqa: F401
                                screenshot, type_text, wait_until)
from tests.helpers import write_image_folder

pytestmark = pytest.mark.gui


def lora(app):
    return app.tabs["train_network"]


def field(app, dest):
    return lora(app).form.fields[dest]


def test_save_as_with_a_dot_in_the_name_keeps_the_whole_name(app, monkeypatch):
    """Bug 3: "SD1.5 LoRA quick" was saved without .toml, named "SD1" and never listed."""
    tab = lora(app)
    folder = presets.user_dir("train_network")
    monkeypatch.setattr("gui.scripttab.filedialog.asksaveasfilename",
                        lambda **kw: str(folder / "SD1.5 LoRA quick"))
    type_text(app.root, field(app, "network_dim").widget, "8")
    path = tab.save_as()
    assert path == folder / "SD1.5 LoRA quick.toml" and path.is_file()
    assert tomllib.loads(path.read_text(encoding="utf-8"))["preset"]["name"] == "SD1.5 LoRA quick"
    assert "SD1.5 LoRA quick" in tab.preset_box.cget("values")
    assert tab.preset_var.get() == "SD1.5 LoRA quick"


def test_resume_is_for_one_run_and_never_saved_into_the_preset(app, tmp_path, monkeypatch):
    """Bug 4: after Resume the form kept the state path; Save wrote it and the next Start resumed."""
    tab = lora(app)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")            # the check only needs it to exist: nothing is run
    write_image_folder(tmp_path / "data", "2_sks disk", count=2, size=64)
    state = tmp_path / "out" / "last-interrupted-state"
    state.mkdir(parents=True)
    tab.form.set_values({"pretrained_model_name_or_path": str(model), "train_data_dir": str(tmp_path / "data"),
                         "output_dir": str(tmp_path / "out"), "resolution": "64"})
    begun = []
    monkeypatch.setattr(app, "_begin", lambda argv, title, tab, **kw: begun.append(argv))
    app.resume(tab, str(state))
    assert wait_until(app.root, lambda: begun, timeout=30), app.statusbar.cget("text")
    config = Path(begun[0][begun[0].index("--config_file") + 1])
    assert tomllib.loads(config.read_text(encoding="utf-8"))["resume"] == str(state)   # this run resumes
    assert field(app, "resume").var.get() == "" and "resume" not in tab.values()[0]  # the form does not
    saved = tab.save_to(tmp_path / "after resume.toml")
    assert "resume" not in tomllib.loads(saved.read_text(encoding="utf-8"))
    begun.clear()
    tab.start_button.invoke()          # the next Start is a fresh run
    assert wait_until(app.root, lambda: begun, timeout=30)
    config = Path(begun[0][begun[0].index("--config_file") + 1])
    assert "resume" not in tomllib.loads(config.read_text(encoding="utf-8"))


def test_presets_and_defaults_keep_the_users_paths(app, tmp_path):
    """Bug 5: Defaults or picking a preset wiped the model, dataset and output paths."""
    tab = lora(app)
    mine = {"pretrained_model_name_or_path": str(tmp_path / "my model.safetensors"),
            "train_data_dir": str(tmp_path / "my data"), "output_dir": str(tmp_path / "my out")}
    for dest, value in mine.items():
        paste_text(app.root, field(app, dest).widget, value)
    type_text(app.root, field(app, "network_dim").widget, "12")
    labels = list(tab.preset_box.cget("values"))
    choose(app.root, tab.preset_box, next(v for v in labels if "locon" in v.lower()))
    values = tab.values()[0]
    assert {k: values.get(k) for k in mine} == mine            # kept
    assert values["network_args"] == ["conv_dim=8", "conv_alpha=4"] and values.get("network_dim") != 12
    assert "kept your" in tab.notes.cget("text")
    type_text(app.root, field(app, "network_dim").widget, "12")
    tab.reset()
    values = tab.values()[0]
    assert values == mine                                       # everything else is back to default
    assert "kept your" in tab.notes.cget("text")


def marked(app, dest) -> bool:
    return str(field(app, dest).widget.cget("style")).startswith("Error.")


def test_marks_go_when_fixed_and_land_on_the_field_to_fix(app, tmp_path):
    """Bug 6: red marks stayed after the fix; a bucket error was pinned on train_data_dir."""
    tab = lora(app)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    write_image_folder(tmp_path / "data", "2_sks disk", count=2, size=64)
    tab.start_button.invoke()
    assert wait_until(app.root, lambda: app.dialogs, timeout=20)
    app.dialogs[-1].ok.invoke()
    assert marked(app, "train_data_dir") and marked(app, "dataset_config")     # "set one of" both
    paste_text(app.root, field(app, "train_data_dir").widget, str(tmp_path / "data"))
    assert not marked(app, "train_data_dir") and not marked(app, "dataset_config")
    tab.form.set_values({"pretrained_model_name_or_path": str(tmp_path / "model.safetensors"),
                         "train_data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
                         "resolution": "64", "enable_bucket": True, "min_bucket_reso": 256})
    app.check_tab(tab)
    assert wait_until(app.root, lambda: len(app.dialogs) == 2, timeout=30), app.statusbar.cget("text")
    app.dialogs[-1].ok.invoke()
    assert marked(app, "min_bucket_reso") and not marked(app, "train_data_dir")
    screenshot(app.root, "fix-bucket-mark")
    type_text(app.root, field(app, "min_bucket_reso").widget, "64")
    assert not any(marked(app, d) for d in ("min_bucket_reso", "max_bucket_reso", "resolution"))


def test_small_annoyances(make_app):
    """Bug 8: the finished header kept speed and ETA; the samples pane asked every tab for
    sample_prompts; Find left blank gaps; the window moved down on every restart; Ctrl+A."""
    from gui.runner import Progress

    app = make_app()
    panel = app.run_panel
    panel.begin("a run")
    panel.show_progress(Progress("steps", 19, 20, "00:30", "00:16", 1.2, {"loss": "0.1"}))
    assert "ETA" in panel.stats.cget("text")
    panel.finish("finished", 0)
    assert "ETA" not in panel.stats.cget("text") and "it/s" not in panel.stats.cget("text")
    assert "20/20" in panel.stats.cget("text")

    assert "Sample prompts" in panel.samples.caption.cget("text")          # LoRA tab in front
    app.notebook.select(app.queue_tab)
    assert wait_until(app.root, lambda: "sample" not in panel.samples.caption.cget("text").lower())

    app.notebook.select(0)
    tab = lora(app)
    tab.filter_var.set("lr")
    app.root.update()
    network = next(s for s in tab.form.sections if s.title == "Network")
    shown = [f for f in network.common + network.advanced if f.visible]
    assert shown and all(not f.spec.kind == "bool" for f in shown)
    bottom = max(f.widget.winfo_y() + f.widget.winfo_height() for f in shown)
    part = network.main
    assert part.winfo_height() - bottom < 12, "blank gap under the found options"
    assert not network.adv_frame.winfo_ismapped()      # no advanced option matches: no empty box

    tab.filter_var.set("")
    entry = field(app, "output_name").widget
    type_text(app.root, entry, "my lora")
    entry.event_generate("<Control-a>")
    app.root.update()
    assert entry.selection_present() and entry.index("sel.first") == 0 and entry.index("sel.last") == 7

    geometry = app.root.geometry()
    app.on_close()
    second = make_app()
    second.root.update()
    assert second.root.geometry() == geometry        # not 32 px lower (the menu bar) each time


# --- readable forms -----------------------------------------------------------------------------

def test_readable_labels_dropdowns_and_required_first(app, tmp_path, monkeypatch):
    tab = lora(app)
    first = tab.form.sections[0]
    assert first.title == "Start here"
    assert [f.spec.dest for f in first.common][:2] == ["pretrained_model_name_or_path", "output_dir"]
    model = field(app, "pretrained_model_name_or_path")
    assert model.label.cget("text") == "Base model *" and "--pretrained_model_name_or_path" in model.tip_text()
    assert field(app, "train_data_dir").label.cget("text") == "Training images folder"
    assert field(app, "network_dim").label.cget("text") == "Network rank (dim)"
    assert field(app, "cache_latents").widget.cget("text") == "Cache latents"
    tab.filter_var.set("rank (dim")                       # Find matches the readable label too
    app.root.update()
    assert field(app, "network_dim").visible
    tab.filter_var.set("")
    # choices are dropdowns; usual values of free-text options too, and any value can be typed
    for dest in ("lr_scheduler", "mixed_precision", "save_model_as", "optimizer_type", "network_module"):
        assert field(app, dest).widget.winfo_class() == "TCombobox", dest
    assert "Prodigy" in field(app, "optimizer_type").widget.cget("values")
    type_text(app.root, field(app, "optimizer_type").widget, "torch.optim.RAdam")
    assert tab.values()[0]["optimizer_type"] == "torch.optim.RAdam"
    # LyCORIS: the algorithm is a dropdown beside the network type, written into network_args
    algo = tab.form.algo
    assert not algo.winfo_manager()
    choose(app.root, field(app, "network_module").widget, "lycoris.kohya")
    assert algo.winfo_manager() and tab.form.algo_var.get() == "lora"
    type_text(app.root, field(app, "network_args").widget, "conv_dim=4")
    choose(app.root, algo, "lokr")
    assert tab.values()[0]["network_args"] == ["algo=lokr", "conv_dim=4"]
    type_text(app.root, field(app, "network_args").widget, "algo=loha")
    assert tab.form.algo_var.get() == "loha"
    # the command wraps over lines, with the flag names
    tab.style_var.set("flags")
    paste_text(app.root, model.widget, str(tmp_path / ("a long folder name " * 4) / "model.safetensors"))
    tab.update_preview()
    app.root.update()
    assert int(tab.cmd_text.cget("height")) >= 2
    assert "--pretrained_model_name_or_path=" in tab.cmd_text.get("1.0", "end")
    screenshot(app.root, "readable-form")


def test_file_dialogs_filter_remember_and_skip_dot_folders(app, tmp_path, monkeypatch):
    from gui import fields

    calls = []
    (tmp_path / "models").mkdir()
    chosen = str(tmp_path / "models" / "base.safetensors")
    monkeypatch.setattr(fields.filedialog, "askopenfilename", lambda **kw: calls.append(kw) or chosen)
    monkeypatch.setattr(fields, "LAST_DIRS", {})
    model = field(app, "pretrained_model_name_or_path")
    model.browse("file")
    assert model.var.get() == chosen
    assert any("*.safetensors" in pattern for _, pattern in calls[0]["filetypes"])
    assert app.root.tk.call("set", "::tk::dialog::file::showHiddenVar") in ("0", 0)
    field(app, "network_weights").browse("file")          # another field starts where the last one was
    assert calls[1]["initialdir"] == str(tmp_path / "models")
    field(app, "dataset_config").browse("file")
    assert calls[2]["filetypes"][0][1] == "*.toml"
    app.on_close()
    assert presets.read_session()["last_dirs"][""] == str(tmp_path / "models")   # remembered across restarts


def test_every_path_option_has_file_buttons(app):
    gen = next((t for t in app.load_all_tools() if t.script == "gen_img"), None)
    assert gen is not None
    for dest in ("controlnet", "control_image", "ckpt", "network_weights", "from_file", "outdir"):
        f = gen.form.fields[dest]
        assert f.path_kind and f.buttons.winfo_children(), dest


# --- sample prompts editor and gallery ------------------------------------------------------------

def test_prompts_editor_writes_the_file_the_trainer_reads(app, tmp_path):
    from gui.prompts_editor import set_options
    from library.prompts import read_prompt_file

    assert set_options("a cat --w 256 --s 20", {"w": "512", "d": "3"}) == "a cat --s 20 --w 512 --d 3"
    tab = lora(app)
    paste_text(app.root, field(app, "output_dir").widget, str(tmp_path / "out"))
    editor = tab.edit_prompts()
    app.root.update()
    assert editor.path == tmp_path / "out" / "sample_prompts.txt" and "--n" in editor.content()   # an example
    editor.text.delete("1.0", "end")
    editor.text.insert("1.0", "a sks disk on a table --w abc\n")
    assert editor.save() is None and "--w" in editor.status.cget("text")          # the trainer's own check
    editor.text.delete("1.0", "end")
    editor.text.insert("1.0", "a sks disk on a table\na red circle --n blurry\n")
    editor.text.mark_set("insert", "1.3")
    editor.option_vars["w"].set("64")
    editor.option_vars["h"].set("64")
    editor.option_vars["ss"].set("euler")
    editor.apply_options()
    screenshot(app.root, "prompts-editor")
    path = editor.save()
    assert path.is_file() and field(app, "sample_prompts").var.get() == str(path)
    prompts = read_prompt_file(path)
    assert [(p.prompt, p.width, p.height, p.sampler) for p in prompts][0] == ("a sks disk on a table", 64, 64,
                                                                                "euler")
    assert prompts[1].negative == "blurry"
    again = tab.edit_prompts()                             # reopens the saved file
    assert again.content() == path.read_text(encoding="utf-8")
    again.destroy()


def test_sample_gallery_shows_every_step_and_enlarges(app, tmp_path, monkeypatch):
    from PIL import Image

    from gui import gallery

    sample = tmp_path / "out" / "sample"
    sample.mkdir(parents=True)
    for step in (2, 4, 6):
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * step, 80 * i, 90)).save(
                sample / f"last_{step:06d}_{i:02d}_20261208-030000_{i}.png")
    Image.new("RGB", (64, 64)).save(sample / "last_e000001_00_20261208-030000_0.png")
    paste_text(app.root, field(app, "output_dir").widget, str(tmp_path / "out"))
    view = app.run_panel.samples.open_gallery()
    app.root.update()
    assert [h for h, _ in view.rows][:3] == ["step 2", "step 4", "step 6"] or \
        sorted(h for h, _ in view.rows) == ["epoch 1", "step 2", "step 4", "step 6"]
    assert all(len(images) == 2 for h, images in view.rows if h.startswith("step"))
    assert "7 image(s)" in view.summary.cget("text")
    thumbs = [w for w in view.scroll.inner.winfo_children() if str(w.cget("cursor")) == "hand2"]
    assert len(thumbs) == 7
    thumbs[0].event_generate("<Button-1>")
    app.root.update()
    assert view.viewer is not None and view.viewer.winfo_exists()
    assert view.viewer.photo.width() > 256                  # enlarged, not the thumbnail
    opened = []
    monkeypatch.setattr(gallery.subprocess, "Popen", lambda argv, **kw: opened.append(argv))
    view.open_folder()
    assert opened and opened[0][-1] == str(sample)
    screenshot(view, "sample-gallery")
    view.viewer.destroy()
    view.close()


# --- kohya_ss preset import (the importer: library/kohya_ss.py, tests/test_kohya_ss_import.py) --------

def test_open_file_imports_a_kohya_ss_json(app, tmp_path, monkeypatch):
    import json

    source = tmp_path / "my kohya_ss preset.json"
    source.write_text(json.dumps({"LoRA_type": "Standard", "network_dim": 8, "optimizer": "AdamW",
                                  "learning_rate": "0.0001", "epoch": 2, "xyz_unknown": 3}), encoding="utf-8")
    monkeypatch.setattr("gui.scripttab.filedialog.askopenfilename", lambda **kw: str(source))
    tab = lora(app)
    tab.open_file()
    app.root.update()
    values = tab.values()[0]
    assert values["network_dim"] == 8 and values["learning_rate"] == 0.0001
    assert "kohya_ss" in tab.notes.cget("text") and "xyz_unknown" in tab.notes.cget("text")
    screenshot(app.root, "kohya-import")


def test_screenshot_tool_shoots_at_the_asked_screen_size(tmp_path):
    import shutil
    import subprocess
    import sys

    from PIL import Image

    if not shutil.which("Xvfb"):
        pytest.skip("no Xvfb")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "tools" / "gui_screenshots.py"), "--size", "1366x768",
                          "--out", str(tmp_path), "--screens", "lora"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    with Image.open(tmp_path / "lora-1366x768.png") as shot:
        assert shot.width == 1366 and 600 < shot.height <= 768       # the whole screen's width, usable height

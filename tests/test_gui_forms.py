"""The real Tk window under Xvfb: generated forms, presets, validation, tabs, tooltips, theming."""
from __future__ import annotations

import argparse
import tomllib

import pytest

from gui import presets
from gui.specs import ALWAYS_HIDDEN
from library import args as A
from tests.gui_fixtures import (app, choose, gui_display, gui_home, make_app, paste_text,  # noqa: F401
                                reveal, screenshot, type_text, wait_until)
from tests.helpers import write_image_folder

pytestmark = pytest.mark.gui


def lora(app):
    return app.tabs["train_network"]


def field(app, dest):
    return lora(app).form.fields[dest]


def shown(app, f) -> bool:
    """Whether a user can see the field once scrolled to it (canvas-embedded widgets are
    unmapped while scrolled out of view, so scroll first)."""
    lora(app).form.scroll.scroll_to(f.widget)
    app.root.update()
    return bool(f.widget.winfo_viewable())


def test_every_option_of_every_script_has_a_widget(app):
    tabs = [t for t in app.tabs.values() if t.entry.kind == "train"] + app.load_all_tools()
    assert {t.entry.module for t in tabs} == {e.module for e in app.present}, "a present script has no tab"
    for tab in tabs:
        hidden = []
        for action in tab.loaded.parser._actions:
            if action.dest in ALWAYS_HIDDEN or action.help == argparse.SUPPRESS:
                hidden.append(action.dest)
                continue
            f = tab.form.fields.get(action.dest)
            assert f is not None and f.widget.winfo_exists(), f"{tab.script}: no widget for --{action.dest}"
        # deliberately hidden: argparse's help, the config-file plumbing, suppressed aliases
        assert set(hidden) <= ALWAYS_HIDDEN | {a.dest for a in tab.loaded.parser._actions
                                               if a.help == argparse.SUPPRESS}, tab.script


def test_controlnet_form_has_no_field_for_the_dataset_flags_it_cannot_use(app):
    """train_controlnet.py's parser leaves out --reg_data_dir and --dataset_config, so its form does too
    (the LoRA form keeps them); its own --log_images_every_n_steps gets a field."""
    controlnet = app.tabs["train_controlnet"].form.fields
    for dest in ("reg_data_dir", "dataset_config"):
        assert dest not in controlnet and dest in lora(app).form.fields
    assert {"train_data_dir", "log_images_every_n_steps"} <= set(controlnet)


def test_registry_shows_present_scripts_and_explains_broken_ones(make_app):
    from gui.registry import SCRIPTS, ScriptEntry

    entries = [SCRIPTS[0], ScriptEntry("Broken", "tests.gui_broken_script", "train"),
               ScriptEntry("Not yet", "train_not_written_yet", "train"),
               ScriptEntry("Future tool", "networks.not_written_yet", "tool")]
    app = make_app(entries=entries, restore=False)
    names = [app.notebook.tab(t, "text") for t in app.notebook.tabs()]
    assert names == ["LoRA", "Broken", "Tools", "Dataset", "Captions", "Queue"]         # a missing script is absent
    broken = app.root.nametowidget(app.notebook.tabs()[1])
    assert "half-written" in broken.winfo_children()[0].cget("text")       # the import error, shown
    tools_note = app.tools_page.winfo_children()[0].cget("text")
    assert "Future tool" in tools_note and "not_written_yet.py" in tools_note


def test_a_new_flag_appears_with_no_gui_change(monkeypatch, make_app):
    import train_network

    original = train_network.setup_parser

    def extended():
        parser = original()
        group = next(g for g in parser._action_groups if g.title == "training")
        group.add_argument("--brand_new_option", type=A.positive_int, default=3, help="a flag added today")
        parser.add_argument_group("experimental").add_argument("--shiny", action="store_true", help="new group")
        return parser

    monkeypatch.setattr(train_network, "setup_parser", extended)
    app = make_app(restore=False)
    new = field(app, "brand_new_option")
    assert new.section.title == "Training" and new in new.section.advanced   # unknown to the layout: Advanced
    assert field(app, "shiny").section.title == "Experimental"
    type_text(app.root, lora(app).filter_entry, "brand_new")
    assert wait_until(app.root, lambda: new.widget.winfo_viewable())
    type_text(app.root, new.widget, "7")
    assert lora(app).values()[0]["brand_new_option"] == 7


def test_fill_save_reload_round_trip_and_run_through_config_file(app, tmp_path):
    tab = lora(app)
    model = tmp_path / "models ü" / "base model.safetensors"
    paste_text(app.root, field(app, "pretrained_model_name_or_path").widget, str(model))
    paste_text(app.root, field(app, "train_data_dir").widget, str(tmp_path / "my data"))
    type_text(app.root, field(app, "output_dir").widget, "out/run 1")
    type_text(app.root, field(app, "network_dim").widget, "16")
    type_text(app.root, field(app, "learning_rate").widget, "1e-4")
    type_text(app.root, field(app, "resolution").widget, "512,768")
    type_text(app.root, field(app, "network_args").widget, "conv_dim=4 conv_alpha=1")
    field(app, "cache_latents").widget.invoke()
    choose(app.root, field(app, "mixed_precision").widget, "bf16")
    choose(app.root, field(app, "lr_scheduler").widget, "cosine_with_restarts")
    type_text(app.root, field(app, "lr_scheduler_num_cycles").widget, "3")
    filled, problems = tab.values()
    assert not problems
    assert filled == {"pretrained_model_name_or_path": str(model), "train_data_dir": str(tmp_path / "my data"),
                      "output_dir": "out/run 1", "network_dim": 16, "learning_rate": 0.0001, "resolution": "512,768",
                      "network_args": ["conv_dim=4", "conv_alpha=1"], "cache_latents": True,
                      "mixed_precision": "bf16", "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3}
    screenshot(app.root, "lora-filled")

    path = tab.save_to(tmp_path / "presets" / "my preset.toml")
    first = path.read_text(encoding="utf-8")
    tab.reset()     # every option back to default; the user's model, data and output paths stay
    assert set(tab.values()[0]) == {"pretrained_model_name_or_path", "train_data_dir", "output_dir"}
    tab.load_file(path)
    assert tab.values()[0] == filled and not tab.dirty
    tab.save_to(tmp_path / "presets" / "again.toml")
    assert (tmp_path / "presets" / "again.toml").read_text(encoding="utf-8") == first   # byte-identical
    # the preset is what the script reads, and the command shown runs that very file
    args = A.parse_args(tab.loaded.parser, ["--config_file", str(path)])
    for key, value in filled.items():
        expected = (512, 768) if key == "resolution" else value
        assert getattr(args, key) == expected, key
    assert tomllib.loads(first)["preset"]["version"] == presets.VERSION
    tab.load_file(path)
    app.root.update()
    assert tab.cmd_var.get().endswith("--config_file 'presets/my preset.toml'")
    tab.copy_command()
    assert app.root.clipboard_get() == tab.cmd_var.get()
    # an edit makes the form differ from the file: the run then reads its own run file
    type_text(app.root, field(app, "network_dim").widget, "8")
    assert tab.dirty and tab.run_file() != path


def test_irrelevant_options_are_hidden_until_they_matter(app):
    cycles, bucket = field(app, "lr_scheduler_num_cycles"), field(app, "min_bucket_reso")
    assert shown(app, field(app, "lr_scheduler")) and shown(app, field(app, "enable_bucket"))
    assert not shown(app, cycles) and not shown(app, bucket)
    choose(app.root, field(app, "lr_scheduler").widget, "cosine_with_restarts")
    field(app, "enable_bucket").widget.invoke()
    assert shown(app, cycles) and shown(app, bucket)
    type_text(app.root, cycles.widget, "4")
    choose(app.root, field(app, "lr_scheduler").widget, "constant")
    assert shown(app, cycles)     # a value that is set is never hidden
    adv = field(app, "noise_offset")
    assert not shown(app, adv)    # advanced options start collapsed
    adv.section.toggle.invoke()
    assert shown(app, adv)


def test_check_lists_every_problem_and_marks_the_fields(app, tmp_path):
    (tmp_path / "a file").write_text("x")
    type_text(app.root, field(app, "network_dim").widget, "0")
    paste_text(app.root, field(app, "train_data_dir").widget, str(tmp_path / "nowhere ü"))
    paste_text(app.root, field(app, "output_dir").widget, str(tmp_path / "a file"))
    lora(app).start_button.invoke()     # Start checks first; nothing may start
    assert wait_until(app.root, lambda: app.dialogs, timeout=20)
    text = app.dialogs[-1].text.get("1.0", "end")
    for dest in ("network_dim", "pretrained_model_name_or_path", "train_data_dir", "output_dir"):
        assert f"{dest}:" in text, dest
        assert str(field(app, dest).widget.cget("style")).startswith("Error."), dest
    assert field(app, "network_dim").help.cget("text").startswith("⚠")
    assert app.run is None
    screenshot(app.root, "check-problems")
    app.dialogs[-1].ok.invoke()
    type_text(app.root, field(app, "network_dim").widget, "4")
    assert not str(field(app, "network_dim").widget.cget("style")).startswith("Error.")  # fixed: unmarked


def test_dataset_tab_preflight(app, tmp_path):
    data = tmp_path / "dätä set"
    write_image_folder(data, "5_sks disk", count=3, size=64)
    write_image_folder(data, "2_other thing", count=2, size=96, seed=1)
    write_image_folder(data, "bad name", count=1, size=64)
    paste_text(app.root, field(app, "train_data_dir").widget, str(data))
    type_text(app.root, field(app, "caption_extension").widget, ".txt")
    field(app, "enable_bucket").widget.invoke()
    type_text(app.root, field(app, "resolution").widget, "64")
    type_text(app.root, field(app, "min_bucket_reso").widget, "64")
    type_text(app.root, field(app, "max_bucket_reso").widget, "128")
    type_text(app.root, field(app, "bucket_reso_steps").widget, "32")
    app.notebook.select(app.dataset_tab)
    app.dataset_tab.check_button.invoke()
    assert wait_until(app.root, lambda: "problem" in app.dataset_tab.state.cget("text"), timeout=30)
    assert "bad name" in app.dataset_tab.problems.cget("text") and "10_bad name" in app.dataset_tab.problems.cget("text")
    (data / "bad name").rename(data / "1_bad name")
    app.dataset_tab.check_button.invoke()
    assert wait_until(app.root, lambda: app.dataset_tab.state.cget("text") == "ok", timeout=30)
    report = app.dataset_tab.report
    assert report.steps_per_epoch == 5 * 3 + 2 * 2 + 1
    assert {(f["repeats"], f["images"]) for f in report.folders} == {(5, 3), (2, 2), (1, 1)}
    assert sum(n for _, _, n in report.buckets) == 20 and "1600 optimizer steps" in report.plan
    assert len(app.dataset_tab.tree.get_children()) == 3 and app.dataset_tab.hist.find_all()
    screenshot(app.root, "dataset-preflight")


def test_folder_helper_builds_the_repeats_layout(app, tmp_path):
    plain = tmp_path / "just images"
    write_image_folder(tmp_path, "just images", count=2)
    t = app.dataset_tab
    t.h_images.set(str(plain))
    t.h_parent.set(str(tmp_path / "dataset"))
    t.h_repeats.set("7")
    t.h_name.set("sks disk")
    t.make_folder()
    assert sorted(p.name for p in (tmp_path / "dataset" / "7_sks disk").iterdir())[:2] == ["img_000.png", "img_000.txt"]
    assert field(app, "train_data_dir").var.get() == str(tmp_path / "dataset")


def test_tooltip_is_shown_above_the_window(app):
    label = field(app, "network_dim").label
    reveal(app.root, label)
    label.event_generate("<Enter>", x=5, y=5)
    tips = lambda: getattr(app.root, "_sdt_tips", [])  # noqa: E731
    assert wait_until(app.root, lambda: tips() and tips()[-1].winfo_viewable(), timeout=5)
    tip = tips()[-1]
    assert "--network_dim" in tip.msg_var.get() and "default: 4" in tip.msg_var.get()
    assert app.root.tk.call("wm", "stackorder", ".")[-1] == str(tip)   # not hidden under the window
    screenshot(app.root, "tooltip")
    label.event_generate("<Leave>")
    assert wait_until(app.root, lambda: not tip.winfo_viewable())


def test_screenshots_of_every_tab(app):
    for index, page in enumerate(app.notebook.tabs()):
        app.notebook.select(page)
        name = app.notebook.tab(page, "text").lower().replace(" ", "-")
        if page == str(app.tools_page):
            for tool in app.tools_notebook.tabs():
                app.tools_notebook.select(tool)
                app.root.update()
                assert app.tool_tab() is not None
                screenshot(app.root, "tab-tools-" + app.tools_notebook.tab(tool, "text").lower().replace(" ", "-"))
        else:
            screenshot(app.root, f"tab-{name}")


def test_dark_theme_and_hidpi_scale(make_app):
    dark = make_app(theme_mode="dark", scale=1.5, restore=False)
    assert dark.palette["name"] == "dark" and dark.scale == pytest.approx(1.5, rel=0.05)
    assert dark.root.winfo_width() <= dark.root.winfo_screenwidth()
    assert dark.root.winfo_height() <= dark.root.winfo_screenheight()
    assert str(dark.run_panel.log.cget("background")) == dark.palette["text_bg"]
    screenshot(dark.root, "theme-dark-150pct")
    dark.theme_mode.set("light")         # View menu: switch while running
    dark.set_theme()
    assert dark.palette["name"] == "light" and str(dark.run_panel.log.cget("background")) == dark.palette["text_bg"]


def test_keyboard_shortcuts(app):
    app.root.focus_force()
    field(app, "network_dim").widget.focus_force()
    app.root.update()
    app.root.event_generate("<Control-f>")
    assert wait_until(app.root, lambda: app.root.focus_get() == lora(app).filter_entry)
    position = app.notebook.index(app.dataset_tab) + 1     # Alt+N selects the N-th tab
    app.root.event_generate(f"<Alt-Key-{position}>")
    assert wait_until(app.root, lambda: app.notebook.select() == str(app.dataset_tab))
    app.notebook.select(0)
    first = field(app, "pretrained_model_name_or_path").widget
    first.focus_force()
    app.root.update()
    first.event_generate("<Tab>")
    assert wait_until(app.root, lambda: app.root.focus_get() not in (None, first))


def test_last_session_is_restored(make_app, tmp_path):
    first = make_app()
    type_text(first.root, field(first, "network_dim").widget, "12")
    lora(first).load_file(presets.BUILTIN_DIR / "train_network" / "locon-style.toml")
    type_text(first.root, field(first, "output_name").widget, "mine")
    first.notebook.select(first.queue_tab)
    first.on_close()
    second = make_app()
    values = lora(second).values()[0]
    assert values["output_name"] == "mine" and values["network_args"] == ["conv_dim=8", "conv_alpha=4"]
    assert second.notebook.select() == str(second.queue_tab)


def test_a_window_size_from_a_bigger_monitor_is_fitted_to_this_screen(make_app, gui_home):
    from library.fileio import write_json_atomic

    write_json_atomic(gui_home / "session.json", {"geometry": "5000x4000+3000+2000"})
    app = make_app()
    app.root.update()
    assert app.root.winfo_rootx() + app.root.winfo_width() <= app.root.winfo_screenwidth()
    assert app.root.winfo_height() <= app.root.winfo_screenheight()

"""GUI logic without a display: parser -> field specs, presets, progress parsing, queue, checks."""
from __future__ import annotations

import argparse
import os

import pytest

from gui import layout, preflight, presets, registry
from gui.runner import LineAssembler, Run, display_command, launch_argv, parse_progress
from gui.runqueue import FAILED, PENDING, RunQueue
from gui.specs import flag_args, is_default, parse_text, spec_from_action, specs_from_parser, value_to_text
from library import args as A


def _parser():
    import train_network

    return train_network.setup_parser()


def _spec(parser, dest):
    return next(s for s in specs_from_parser(parser) if s.dest == dest)


# --- specs --------------------------------------------------------------------------------------

def test_specs_map_argparse_to_widget_kinds():
    p = _parser()
    kinds = {s.dest: s.kind for s in specs_from_parser(p)}
    assert kinds["cache_latents"] == "bool" and kinds["mixed_precision"] == "choice"
    assert kinds["network_args"] == "list" and kinds["learning_rate"] == "text"
    assert "help" not in kinds and "config_file" not in kinds and "caption_extention" not in kinds  # hidden
    assert _spec(p, "lr_scheduler").choices[0] == "constant" and _spec(p, "max_train_steps").default == 1600


def test_text_values_use_the_scripts_own_range_checks():
    p = _parser()
    dim = _spec(p, "network_dim")
    assert parse_text(dim, "16") == 16
    with pytest.raises(ValueError, match=">= 1"):
        parse_text(dim, "0")
    with pytest.raises(ValueError, match="choose one of"):
        parse_text(_spec(p, "max_token_length"), "100")
    res = _spec(p, "resolution")
    assert parse_text(res, "512,768") == "512,768"        # kept as text, checked by resolution()
    with pytest.raises(ValueError):
        parse_text(res, "500")
    args = _spec(p, "network_args")
    assert parse_text(args, 'conv_dim=4 "a=b c"') == ["conv_dim=4", "a=b c"]
    assert value_to_text(args, ["conv_dim=4", "a=b c"]) == "conv_dim=4 'a=b c'"
    assert parse_text(_spec(p, "learning_rate"), "") == 2e-6 and is_default(_spec(p, "learning_rate"), 2e-6)


def test_on_off_switches_are_three_state():
    parser = argparse.ArgumentParser()
    parser.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None, help="auto by default")
    spec = specs_from_parser(parser)[0]
    assert spec.kind == "tristate"
    assert [parse_text(spec, t) for t in ("", "true", "false")] == [None, True, False]
    assert flag_args(spec, False) == ["--no-freeze"] and flag_args(spec, True) == ["--freeze"]
    assert preflight.cli_args([spec], {"freeze": False}) == ["--no-freeze"]   # also on the command line
    assert parser.parse_args(preflight.cli_args([spec], {"freeze": False})).freeze is False


def test_flag_args_for_command_lines():
    p = _parser()
    assert flag_args(_spec(p, "cache_latents"), True) == ["--cache_latents"]
    assert flag_args(_spec(p, "network_args"), ["conv_dim=4"]) == ["--network_args", "conv_dim=4"]
    assert flag_args(_spec(p, "output_dir"), "my out") == ["--output_dir=my out"]
    positional = argparse.ArgumentParser().add_argument("file")
    assert flag_args(spec_from_action(positional, "options"), "a b.safetensors") == ["a b.safetensors"]


def test_path_kinds_and_layout_rules():
    assert layout.path_kind("train_data_dir") == "dir" and layout.path_kind("output_dir") == "save_dir"
    assert layout.path_kind("save_to") == "save_file" and layout.path_kind("models", True) == "files"
    assert layout.path_kind("network_dim") is None and layout.path_kind("output_name") is None
    # guessed from the name for options no layout entry knows (tools, new scripts)
    guesses = {"save_dir": "save_dir", "outdir": "save_dir", "log_dir": "save_dir", "data_dir": "dir",
               "ckpt": "file_or_dir", "model_org": "file_or_dir", "backbone_weights": "file", "from_file": "file",
               "lora_rank": None, "save_precision": None, "dynamo_mode": None, "loss_weight_factor": None,
               "log_tracker_config": "file", "conditioning_data_dir": "dir"}
    assert {d: layout.path_kind(d) for d in guesses} == guesses
    assert layout.is_secret("wandb_api_key") and not layout.is_secret("network_dim")
    # a known group title used by another script for other options: all of them are shown
    assert layout.section_of("model", ["backbone", "feature_dim"])[1] is None
    assert layout.section_of("model", ["pretrained_model_name_or_path", "vae"])[1][0] == "pretrained_model_name_or_path"
    values = {"lr_scheduler": "cosine"}
    assert not layout.condition_holds(layout.SHOW_IF["lr_scheduler_num_cycles"], values.__getitem__)
    values["lr_scheduler"] = "cosine_with_restarts"
    assert layout.condition_holds(layout.SHOW_IF["lr_scheduler_num_cycles"], values.__getitem__)


def test_layout_rules_name_real_choices_of_every_script():
    """A SHOW_IF rule that names a value the controlling option no longer offers (or an option
    no script has) would hide a field for ever: catch the drift when a script changes."""
    parsers = [registry.load_script(e).parser for e in registry.present()]
    parsers = [p for p in parsers if p is not None]
    dests = {a.dest: a for p in parsers for a in p._actions}
    for target, rule in layout.SHOW_IF.items():
        for cond in rule if isinstance(rule, list) else [rule]:
            if target not in dests:
                continue
            assert cond[0] in dests, f"{target}: controlled by unknown option {cond[0]}"
            if cond[1] in ("in", "not in"):
                choices = dests[cond[0]].choices
                assert choices and set(cond[2]) <= set(choices), f"{target}: {cond[2] - set(choices or [])}"


# --- presets ------------------------------------------------------------------------------------

def test_preset_round_trip_and_config_file(tmp_path):
    p = _parser()
    known = {a.dest for a in p._actions}
    values = {"pretrained_model_name_or_path": "models/mödel one.safetensors", "network_dim": 8,
              "learning_rate": 0.0001, "network_args": ["conv_dim=4", "conv_alpha=1"], "cache_latents": True,
              "resolution": "512,768"}
    path = presets.save(tmp_path / "p.toml", "train_network", values, name="My preset")
    loaded = presets.load(path, known, "train_network")
    assert loaded.values == values and loaded.name == "My preset" and not loaded.unknown and not loaded.notes
    # the script reads it unchanged: the [preset] table is skipped, everything else is a flag
    args = A.parse_args(p, ["--config_file", str(path)])
    assert args.network_dim == 8 and args.learning_rate == 0.0001 and args.resolution == (512, 768)
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"] and args.cache_latents
    assert args.pretrained_model_name_or_path == "models/mödel one.safetensors"
    assert path.read_text(encoding="utf-8").startswith("# sd-trainers preset v1")


def test_read_config_file_skips_only_the_preset_table(tmp_path):
    p = _parser()
    f = tmp_path / "c.toml"
    f.write_text('network_dim = 4\n[preset]\nversion = 1\nscript = "x"\n[preset.unknown]\nfoo = 1\n', encoding="utf-8")
    assert A.read_config_file(p, str(f)) == {"network_dim": 4}
    f.write_text('network_dim = 4\nversion = 1\n', encoding="utf-8")     # outside [preset]: still an error
    with pytest.raises(Exception, match="unknown key 'version'"):
        A.read_config_file(p, str(f))


def test_unknown_keys_are_reported_and_kept_then_restored(tmp_path):
    known = {a.dest for a in _parser()._actions}
    text = '[model]\nnetwork_dim = 8\nmy_future_flag = "x"\n[training]\nsome_gui_key = 3\n'
    preset = presets.parse(text, known, "train_network")
    assert preset.values == {"network_dim": 8}
    assert preset.unknown == {"my_future_flag": "x", "some_gui_key": 3}
    assert any("my_future_flag" in n and "kept" in n for n in preset.notes)
    saved = presets.dump("train_network", preset.values, unknown=preset.unknown)
    again = presets.parse(saved, known, "train_network")
    assert again.unknown == preset.unknown and again.values == preset.values
    # a later script knows my_future_flag: it comes back as a value
    restored = presets.parse(saved, known | {"my_future_flag"}, "train_network")
    assert restored.values["my_future_flag"] == "x" and "my_future_flag" not in restored.unknown
    # and the file still runs through the script (unknown keys are inside [preset])
    f = tmp_path / "u.toml"
    f.write_text(saved, encoding="utf-8")
    assert A.parse_args(_parser(), ["--config_file", str(f)]).network_dim == 8


def test_builtin_presets_load_cleanly_and_parse_with_the_script():
    labels = [f.label for f in presets.list_presets("train_network") if f.builtin]
    assert "SD1.5 LoRA quick" in labels and "LoCon style" in labels
    checked = 0
    for entry in registry.present():
        found = [f for f in presets.list_presets(entry.stem) if f.builtin]
        if not found:
            continue
        p = registry.load_script(entry).parser
        known = {a.dest for a in p._actions}
        for f in found:
            preset = presets.load(f.path, known, entry.stem)
            assert not preset.unknown and not preset.notes, f.path
            A.parse_args(p, ["--config_file", str(f.path)])   # raises on any bad key or value
            checked += 1
    assert checked >= 2


def test_gui_home_and_user_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("SDT_GUI_HOME", str(tmp_path / "home"))
    presets.save(presets.user_dir("train_network") / "mine.toml", "train_network", {"network_dim": 2}, name="Mine")
    found = presets.list_presets("train_network")
    assert [f.label for f in found if not f.builtin] == ["Mine"]
    assert presets.safe_filename("a/b:c") == "a_b_c"


# --- runner -------------------------------------------------------------------------------------

BAR = "steps:  37%|███▋      | 22/60 [00:16<00:22,  1.73it/s, loss=1.0001, avr_loss=1.0462, lr=0.001]"


def test_parse_tqdm_progress():
    p = parse_progress(BAR)
    assert (p.desc, p.n, p.total, p.eta, p.rate) == ("steps", 22, 60, "00:22", 1.73)
    assert p.postfix == {"loss": "1.0001", "avr_loss": "1.0462", "lr": "0.001"}
    slow = parse_progress("steps:   0%|          | 1/60 [01:02<1:01:00,  4.20s/it]")
    assert slow.rate == pytest.approx(1 / 4.2) and slow.eta == "1:01:00"
    assert parse_progress("saved out/last.safetensors") is None


def test_line_assembler_turns_carriage_returns_into_a_live_line():
    a = LineAssembler()
    lines, live = a.feed(b"loading\n\rsteps: 1/3\rsteps: 2/3")
    assert lines == ["loading"] and live == "steps: 2/3"
    lines, live = a.feed("\rsteps: 3/3\nübrig\n".encode()[:-3])     # a UTF-8 char split across reads
    assert lines == ["steps: 3/3"]
    lines, live = a.feed("übrig\n".encode()[-3:])
    assert lines == ["übrig"] and live == ""
    bar = "steps:  50%|#####     | 1/2 [00:01<00:01,  1.00it/s, loss=1.0]"
    lines, live = a.feed(f"\r{bar}[transformers] a warning\n".encode())
    assert lines == ["[transformers] a warning"]          # not glued to the bar
    assert a.feed(b"tail without newline")[1] == "tail without newline"
    assert a.feed(b"") == (["tail without newline"], "")


def test_commands_use_the_venv_python_and_quote_paths(tmp_path):
    import sys

    argv = launch_argv(tmp_path / "train_network.py", ["--config_file", str(tmp_path / "my preset.toml")])
    assert argv[0] == sys.executable
    text = display_command(argv, str(tmp_path))
    assert "train_network.py --config_file 'my preset.toml'" in text
    assert launch_argv("s.py", [], "accelerate")[1:3] in (["launch", "s.py"], ["-m", "accelerate.commands.launch"])


def test_run_outcomes(tmp_path):
    import sys
    import time

    ok = Run([sys.executable, "-c", "print('hi')"]).start()
    bad = Run([sys.executable, "-c", "import sys; print('error: broken input'); sys.exit(2)"]).start()
    end = time.monotonic() + 20
    while (ok.running or bad.running) and time.monotonic() < end:
        time.sleep(0.05)
    assert ok.outcome() == "finished" and bad.outcome() == "failed" and bad.returncode == 2
    assert bad.error_text() == "error: broken input"


# --- queue --------------------------------------------------------------------------------------

def test_queue_order_moves_and_persistence(tmp_path):
    q = RunQueue(tmp_path / "q")
    a = q.add("train_network", "first", text="network_dim = 1\n")
    b = q.add("train_network", "second", text="network_dim = 2\n")
    q.add("train_network", "third", text="network_dim = 3\n")
    assert q.move(2, -2) == 0 and [i.name for i in q.items] == ["third", "first", "second"]
    q.mark(a, FAILED, 2, "error: x")
    q.continue_on_error = True
    q.save()
    again = RunQueue(tmp_path / "q")
    assert [i.name for i in again.items] == ["third", "first", "second"] and again.continue_on_error
    assert again.items[1].status == FAILED and again.next_pending().name == "third"
    q.remove(2)
    assert not os.path.exists(b.path) and len(q.items) == 2 and q.items[0].status == PENDING


# --- checks -------------------------------------------------------------------------------------

def test_path_and_required_checks(tmp_path):
    (tmp_path / "data").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    kinds = {"train_data_dir": "dir", "pretrained_model_name_or_path": "file_or_dir", "output_dir": "save_dir"}
    problems = preflight.check_paths(kinds, {"train_data_dir": "data", "pretrained_model_name_or_path": "nope.ckpt",
                                             "output_dir": "new/out dir"}, str(tmp_path))
    assert [(p.dest, p.message.split(":")[0]) for p in problems] == [("pretrained_model_name_or_path",
                                                                     "file or folder not found")]
    if os.geteuid() != 0:   # root may write anywhere
        ro.chmod(0o500)
        assert preflight.check_paths(kinds, {"output_dir": str(ro / "x")}, str(tmp_path))
    req = layout.required_for("train", {"pretrained_model_name_or_path", "output_dir", "train_data_dir",
                                        "dataset_config"})
    missing = preflight.check_required(req, {"output_dir": "o"})
    assert {p.dest for p in missing} == {"pretrained_model_name_or_path", "train_data_dir", "dataset_config"}


def test_a_shared_parser_forgets_the_last_config_file(tmp_path):
    """Bug: parse_args left the config file's values as the parser's defaults, so the GUI's
    next check (same parser) still saw a cleared dataset_config or max_train_epochs."""
    from tests.helpers import write_image_folder

    p = _parser()
    specs = specs_from_parser(p)
    write_image_folder(tmp_path / "data", "5_sks disk", count=2, size=64)
    (tmp_path / "notes.txt").write_text("not toml [", encoding="utf-8")
    base = {"pretrained_model_name_or_path": "m.safetensors", "output_dir": "out",
            "train_data_dir": str(tmp_path / "data"), "resolution": "64"}
    first, _ = preflight.parse_like_script(p, "train_network", specs, {**base, "dataset_config": "notes.txt",
                                                                       "max_train_epochs": 10}, str(tmp_path))
    assert first.dataset_config == "notes.txt" and first.max_train_epochs == 10
    second, problem = preflight.parse_like_script(p, "train_network", specs, {**base, "max_train_steps": 20},
                                                  str(tmp_path))
    assert problem is None and second.dataset_config is None and second.max_train_epochs is None
    assert preflight.training_plan(second, 10).startswith("20 optimizer steps")
    assert p.get_default("max_train_epochs") is None and p.get_default("max_train_steps") == 1600


def test_token_options_are_not_masked_like_passwords():
    for dest in ("keep_tokens", "keep_tokens_separator", "max_token_length", "tokenizer_cache_dir"):
        assert not layout.is_secret(dest), dest
    for dest in ("hf_token", "huggingface_token", "wandb_api_key", "password", "client_secret"):
        assert layout.is_secret(dest), dest


def test_registry_lists_present_scripts_and_loads_parsers():
    present = registry.present()
    assert any(e.module == "train_network" for e in present)
    loaded = registry.load_script(next(e for e in present if e.module == "train_network"))
    assert loaded.ok and loaded.parser.prog
    ghost = registry.ScriptEntry("Ghost", "no_such_script_here", "train")
    assert registry.load_script(ghost) is None and ghost in registry.missing([ghost])


STUBBORN = r"""
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)     # a script that ignores Ctrl+C and SIGTERM ...
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # ... and has a child
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_escalates_until_the_whole_group_is_gone():
    import sys
    import time

    run = Run([sys.executable, "-c", STUBBORN], stop_grace=0.5, term_grace=0.5).start()
    end = time.monotonic() + 20
    while "ready" not in run.tail and time.monotonic() < end:
        time.sleep(0.05)
    run.stop()                      # SIGINT, then SIGTERM after 0.5 s, then SIGKILL
    while run.running and time.monotonic() < end:
        time.sleep(0.05)
    assert run.returncode == -9 and run.outcome() == "stopped"
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pgid, 0)      # the child is gone too

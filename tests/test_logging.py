"""Logging (kohya's flags): TensorBoard scalars and folders, --log_tracker_config / --log_config, and
wandb: a clear error without it, offline mode and the same logs with it (a stand-in package)."""
from __future__ import annotations

import sys
import textwrap

import pytest

from library.errors import UserError
from tests.helpers import run_train_network, write_image_folder


def args_for(model, data, out, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=64", "--network_dim=4", "--max_train_steps=2", "--seed=1", "--caption_extension=.txt",
            "--max_data_loader_n_workers=0", *extra]


def test_tensorboard_gets_losses_and_lr_per_group(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=1)
    logs = tmp_path / "logs"
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text("[tensorboard]\nflush_secs = 5\n")
    run_train_network(args_for(tiny_model.single_file, data, tmp_path / "out", f"--logging_dir={logs}",
                               "--log_with=tensorboard", "--log_prefix=mine_", "--log_tracker_name=lora_runs",
                               f"--log_tracker_config={tracker_config}", "--log_config",
                               "--unet_lr=0.002", "--text_encoder_lr=0.0005"))
    # kohya's layout: <logging_dir>/<log_prefix><time>/<tracker name>/events...
    (run_dir,) = list(logs.iterdir())
    assert run_dir.name.startswith("mine_") and run_dir.name[5:].isdigit()
    events = list((run_dir / "lora_runs").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "lora_runs"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("loss/current", "loss/average", "lr/unet", "lr/textencoder"):
        assert tag in scalars, scalars
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    assert acc.Scalars("lr/unet")[0].value == pytest.approx(0.002)
    assert acc.Scalars("lr/textencoder")[0].value == pytest.approx(0.0005)
    assert list(run_dir.rglob("hparams.yml"))  # --log_config stored the arguments


def test_bad_tracker_config_and_missing_wandb_stop_before_training(tiny_model, tmp_path, monkeypatch):
    import accelerate.utils

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=1)
    bad = tmp_path / "bad.toml"
    bad.write_text("flush_secs = 5\n")
    with pytest.raises(UserError, match="one table per tracker"):
        run_train_network(args_for(tiny_model.single_file, data, tmp_path / "a", f"--logging_dir={tmp_path / 'l'}",
                                   f"--log_tracker_config={bad}"))
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    for choice in ("wandb", "all"):
        with pytest.raises(UserError, match="pip install wandb"):
            run_train_network(args_for(tiny_model.single_file, data, tmp_path / "b", f"--log_with={choice}"))
    assert not (tmp_path / "b" / "last.safetensors").exists()


FAKE_WANDB = '''
"""A stand-in for wandb that records what the trainer asks of it."""
import os

calls = []


class _Config:
    def update(self, values, allow_val_change=False):
        calls.append(("config", dict(values)))


config = _Config()


class Image:
    def __init__(self, data, caption=None):
        self.size, self.caption = data.size, caption


class _Run:
    def log(self, values, step=None, commit=None):
        calls.append(("log", values, step))

    def finish(self):
        calls.append(("finish",))


def init(**kwargs):
    calls.append(("init", kwargs, os.environ.get("WANDB_MODE"), os.environ.get("WANDB_DIR")))
    return _Run()
'''


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """An installed-looking wandb package (module + dist-info), removed again afterwards."""
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(textwrap.dedent(FAKE_WANDB))
    (site / "wandb-0.0.1.dist-info").mkdir()
    (site / "wandb-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(site))
    import accelerate.tracking as tracking  # accelerate lists the installed trackers once, at import

    monkeypatch.setattr(tracking, "_available_trackers", [*tracking.get_available_trackers(), tracking.LoggerType.WANDB])
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):  # set-then-delete: restored to unset afterwards
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    yield
    sys.modules.pop("wandb", None)


def test_wandb_runs_offline_with_the_same_logs(fake_wandb, tiny_model, tmp_path, capsys):
    import os

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks disk --w 64 --h 64 --s 2 --d 3\n")
    logs = tmp_path / "logs"
    run_train_network(args_for(tiny_model.single_file, data, tmp_path / "out", "--log_with=all", f"--logging_dir={logs}",
                               "--wandb_run_name=first try", "--wandb_api_key=secret", "--log_config",
                               f"--sample_prompts={prompts}", "--sample_every_n_steps=2"))
    import wandb

    init = [c for c in wandb.calls if c[0] == "init"]
    assert len(init) == 1
    _, kwargs, mode, wandb_dir = init[0]
    assert kwargs == {"project": "network_train", "name": "first try"}
    assert mode == "offline" and wandb_dir.startswith(str(logs))
    assert "WANDB_MODE=offline" in capsys.readouterr().out  # and the user is told
    assert os.environ["WANDB_API_KEY"] == "secret"
    config = [c[1] for c in wandb.calls if c[0] == "config"][0]
    assert config["network_dim"] == 4 and "wandb_api_key" not in config
    logged = [(c[1], c[2]) for c in wandb.calls if c[0] == "log"]
    steps = [step for values, step in logged if "loss/current" in values]
    assert steps == [1, 2] and all("lr/unet" in v for v, s in logged if "loss/current" in v)
    (sample,) = [v["sample_00"] for v, s in logged if "sample_00" in v]
    assert sample.size == (64, 64) and sample.caption == "a sks disk"
    assert ("finish",) in wandb.calls
    assert list(logs.rglob("events.out.tfevents.*"))  # TensorBoard too, with --log_with all

    # A WANDB_MODE the user set is left alone.
    os.environ["WANDB_MODE"] = "disabled"
    wandb.calls.clear()
    run_train_network(args_for(tiny_model.single_file, data, tmp_path / "out2", "--log_with=wandb"))
    assert [c[2] for c in wandb.calls if c[0] == "init"] == ["disabled"]

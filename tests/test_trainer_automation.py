"""Trainer automation in library/training/loop.py and the shared flags: save_top_k, fast_dev_run,
overfit_batches, resume's data position, Lightning's flag names, batch sharing between processes.

The loop tests drive run_training with a one-weight model and a toy batch group (milliseconds);
the end-to-end ones run train_network.py on the tiny model. The multi-process run itself is in
tests/test_distributed.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from library.data.loader import Shard, shard_bounds, slice_batch, take_shard
from library.errors import UserError
from library.training.checkpoint import TopKCheckpoints, top_k_file_name
from library.training.loop import LoopHooks, LoopSettings, prepare_group, run_training, steps_and_epochs
from tests.helpers import run_train_network, write_image_folder
from tests.test_train_network import base_args


# --- a toy group and a one-weight model for the loop ---------------------------------------------------

class ToyGroup:
    """`n_items` numbered items in batches of `batch_size`, order shuffled by (seed, epoch)."""

    def __init__(self, n_items: int, batch_size: int = 1):
        self.n_items, self.per_process, self.batch_scale = n_items, batch_size, 1

    def set_batch_scale(self, processes: int) -> None:
        self.batch_scale = processes

    @property
    def num_batches_per_epoch(self) -> int:
        return -(-self.n_items // (self.per_process * self.batch_scale))

    def epoch_dataset(self, epoch: int, seed: int | None = None, start: int = 0):
        order = np.random.default_rng([seed or 0, epoch]).permutation(self.n_items).tolist()
        bs = self.per_process * self.batch_scale
        batches = [order[k:k + bs] for k in range(0, self.n_items, bs)]
        return [{"ids": ids, "x": torch.tensor(ids, dtype=torch.float32)[:, None]} for ids in batches[start:]]


def accelerator():
    from accelerate import Accelerator

    from library.training.accel import reset_accelerate

    reset_accelerate()
    return Accelerator(cpu=True)


def toy_run(tmp_path, group, *, values=None, resume=None, **settings):
    """Train w in y = w * x towards y = 0.5 x; returns (state, ids seen per step, validate calls, model)."""
    from library.logs import ProgressLogger

    torch.manual_seed(0)
    acc = accelerator()
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.01))
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    seen, calls = [], []
    out = tmp_path / "out"

    def compute_loss(batch):
        seen.append(list(batch["ids"]))
        return (model(batch["x"]) - 0.5 * batch["x"]).pow(2).mean()

    def save_model(kind, epoch, step):
        name = {"top": top_k_file_name("m", "pt", step), "final": "m.pt", "epoch": f"m-{epoch:06d}.pt",
                "step": f"m-step{step:08d}.pt"}[kind]
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / name)
        return out / name

    def validate():
        calls.append(len(seen))
        return {"loss/validation": values[len(calls) - 1]} if values else {}

    n = group.num_batches_per_epoch
    max_steps, epochs = steps_and_epochs(n, 1, settings.pop("max_train_steps", 100),
                                         settings.pop("max_train_epochs", None))
    cfg = LoopSettings(max_train_steps=max_steps, num_epochs=epochs, gradient_accumulation_steps=1,
                       max_grad_norm=0.0, output_dir=out, output_name="m", seed=3, resume=resume, **settings)
    hooks = LoopHooks(compute_loss=compute_loss, save_model=save_model, trainable=model,
                      validate=validate if values is not None else None)
    state = run_training(acc, group, optimizer, scheduler, hooks, cfg, torch.Generator().manual_seed(3),
                         ProgressLogger(acc))
    return state, seen, calls, model


# --- resume ---------------------------------------------------------------------------------------------

def test_resume_restores_the_data_position(tmp_path):
    full_state, full_seen, _, full_model = toy_run(tmp_path / "a", ToyGroup(3), max_train_steps=7,
                                                   save_every_n_steps=4, save_state=True)
    saved = tmp_path / "a" / "out" / "m-step00000004-state"
    info = json.loads((saved / "train_state.json").read_text())
    assert (info["global_step"], info["epoch"], info["next_batch"]) == (4, 1, 1)  # step 4 = epoch 2, batch 2
    state, seen, _, model = toy_run(tmp_path / "b", ToyGroup(3), max_train_steps=7, resume=str(saved))
    assert seen == full_seen[4:]  # the resumed run goes on with exactly the batches still to come
    assert (state.global_step, state.epoch) == (full_state.global_step, full_state.epoch)
    assert torch.equal(model.weight, full_model.weight)


# --- save_top_k -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, kept", [("min", [4, 2]), ("max", [5, 1])])
def test_save_top_k_keeps_exactly_the_k_best_files_and_the_last(tmp_path, mode, kept):
    values = [0.5, 0.3, 0.4, 0.2, 0.6]  # loss/validation at the end of epochs 1..5 (2 steps each)
    state, _, calls, _ = toy_run(tmp_path, ToyGroup(2), values=values, max_train_epochs=5, save_top_k=2,
                                 monitor_mode=mode)
    assert len(calls) == 5
    out = tmp_path / "out"
    expected = {top_k_file_name("m", "pt", 2 * epoch) for epoch in kept}
    assert {p.name for p in out.iterdir()} == expected | {"m.pt", "m-top_k.json"}
    index = json.loads((out / "m-top_k.json").read_text())
    assert [e["epoch"] for e in index["best_first"]] == kept
    assert [e["value"] for e in index["best_first"]] == [values[e - 1] for e in kept]
    assert state.extra["top_k"] == index["best_first"]  # kept in the state folders for --resume


def test_save_top_k_names_the_logged_metrics_when_the_monitored_one_never_comes(tmp_path, capsys):
    toy_run(tmp_path, ToyGroup(2), max_train_epochs=2, save_top_k=1, monitor="loss/valdation")
    err = capsys.readouterr().err
    assert "loss/valdation was never logged" in err and "loss/epoch" in err and "loss/average" in err
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"m.pt"}


def test_top_k_ranking_rules():
    top = TopKCheckpoints(2, "loss/validation", "min")
    assert top.wants(1.0, 1) and top.add(1.0, 1, 1, "x/a") == []
    assert top.wants(2.0, 2) and top.add(2.0, 1, 2, "x/b") == []
    assert not top.wants(2.0, 3)             # a tie with the worst kept file does not replace it
    assert not top.wants(float("nan"), 4)    # NaN never counts
    assert not top.wants(0.5, 2)             # a step already kept is not saved twice
    assert top.add(0.5, 2, 5, "x/c") == [Path("x/b")]
    assert [e["step"] for e in top.entries] == [5, 1]


def test_save_top_k_by_validation_loss_in_train_network(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=4)
    out, logs = tmp_path / "out", tmp_path / "logs"
    result = run_train_network(base_args(tiny_model.single_file, data, out, "--max_train_epochs=4", "--val_split=0.25",
                                         "--save_top_k=2", "--cache_latents", f"--logging_dir={logs}",
                                         "--log_with=tensorboard"))
    acc = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss/validation")}
    assert len(logged) == 4  # one validation per epoch
    best = sorted(logged.items(), key=lambda kv: kv[1])[:2]
    index = json.loads((out / "last-top_k.json").read_text())
    assert [e["step"] for e in index["best_first"]] == [step for step, _ in best]
    assert [e["value"] for e in index["best_first"]] == pytest.approx([value for _, value in best])
    models = sorted(p.name for p in out.glob("*.safetensors"))
    assert models == sorted(["last.safetensors", *(top_k_file_name("last", "safetensors", s) for s, _ in best)])
    assert len(result["state"].extra["top_k"]) == 2


# --- fast_dev_run and overfit_batches --------------------------------------------------------------------

def test_fast_dev_run_trains_and_validates_but_writes_nothing(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks disk --w 64 --h 64 --s 1 --d 1\n")
    out, logs = tmp_path / "out", tmp_path / "logs"
    result = run_train_network(base_args(tiny_model.single_file, data, out, "--fast_dev_run", "--max_train_steps=50",
                                         "--val_split=0.25", "--save_state", "--save_every_n_steps=1",
                                         "--save_top_k=1", f"--logging_dir={logs}", "--log_with=tensorboard",
                                         f"--sample_prompts={prompts}", "--sample_at_first",
                                         "--sample_every_n_steps=1", "--profile", "--cache_latents_to_disk"))
    assert result["state"].global_step == 2 and result["files"] == []
    assert not out.exists() and not logs.exists()
    assert sorted(p.suffix for p in data.rglob("*") if p.is_file()) == [".png"] * 4 + [".txt"] * 4  # no latent files
    assert "fast_dev_run: validation loss/validation" in capsys.readouterr().out


def test_overfit_batches_trains_on_the_first_batches_only(tmp_path):
    group = prepare_group(ToyGroup(6), 1, overfit_batches=2)
    assert group.num_batches_per_epoch == 2
    state, seen, _, _ = toy_run(tmp_path, group, max_train_epochs=3)
    first_two = [b["ids"] for b in ToyGroup(6).epoch_dataset(0, 3)[:2]]
    assert seen == first_two * 3 and state.global_step == 6


# --- Lightning's names and the other new flags -----------------------------------------------------------

def parse(argv):
    import train_network
    from library import args as A

    return A.parse_args(train_network.setup_parser(), ["--pretrained_model_name_or_path=x", *argv])


def test_lightning_flag_names_are_aliases(tmp_path):
    from library.training.accel import apply_precision_alias

    args = parse(["--accumulate_grad_batches=4", "--gradient_clip_val=0.5", "--resume_from_checkpoint=s",
                  "--val_split=0.2", "--precision=bf16-mixed"])
    assert (args.gradient_accumulation_steps, args.max_grad_norm, args.resume, args.validation_split) == (4, 0.5, "s", 0.2)
    apply_precision_alias(args)
    assert args.mixed_precision == "bf16"
    with pytest.raises(UserError, match="--precision 16-mixed"):
        apply_precision_alias(parse(["--precision=16-mixed", "--mixed_precision=bf16"]))
    assert parse(["--fast_dev_run"]).fast_dev_run == 2 and parse(["--fast_dev_run", "5"]).fast_dev_run == 5
    assert parse([]).fast_dev_run == 0
    config = tmp_path / "c.toml"
    config.write_text("fast_dev_run = true\n")
    assert parse([f"--config_file={config}"]).fast_dev_run == 2


def test_val_split_is_deterministic_disjoint_and_follows_the_validation_seed(tmp_path):
    from library.data import build_dataset_group, dataset_configs_from_args
    from library.training.validation import split_validation

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=8)

    def held_out(*argv):
        args = parse([f"--train_data_dir={data}", "--resolution=64", "--caption_extension=.txt", *argv])
        group = build_dataset_group(dataset_configs_from_args(args), seed=args.seed)
        seed = args.validation_seed if args.validation_seed is not None else args.seed
        train, val = split_validation(group, args.validation_split, seed)
        train_paths, val_paths = {r.path for r in train.images}, {r.path for r in val.images}
        assert train_paths.isdisjoint(val_paths) and len(train_paths | val_paths) == 8
        return val_paths

    first = held_out("--val_split=0.25", "--seed=1")
    assert len(first) == 2 and held_out("--val_split=0.25", "--seed=1") == first
    # the same --validation_seed holds out the same images whatever --seed is
    assert held_out("--val_split=0.25", "--seed=2", "--validation_seed=1") == first


def test_log_images_every_n_steps_is_sampling_every_n_steps():
    from library.lora.trainer import check_log_images

    args = parse(["--log_images_every_n_steps=3", "--sample_prompts=p.txt"])
    check_log_images(args)
    assert args.sample_every_n_steps == 3
    with pytest.raises(UserError, match="--sample_prompts"):
        check_log_images(parse(["--log_images_every_n_steps=3"]))
    with pytest.raises(UserError, match="pass only one"):
        check_log_images(parse(["--log_images_every_n_steps=3", "--sample_prompts=p.txt", "--sample_every_n_epochs=1"]))


def test_deepspeed_without_the_package_and_fsdp_for_a_lora_are_clear_errors(monkeypatch, tmp_path, capsys):
    import importlib.util

    from accelerate.utils import DistributedType

    import train_network
    from library.errors import run_cli
    from library.lora.trainer import check_distributed_type

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    argv = ["--pretrained_model_name_or_path=m.safetensors", f"--train_data_dir={tmp_path}", f"--output_dir={tmp_path}"]
    assert run_cli(train_network.main, argv) == 2
    err = capsys.readouterr().err
    assert "error: the accelerate config asks for DeepSpeed" in err and "pip install deepspeed" in err
    assert "Traceback" not in err
    with pytest.raises(UserError, match="FSDP"):
        check_distributed_type(parse([]), SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(UserError, match="--save_state"):
        check_distributed_type(parse(["--save_state"]), SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


# --- batches shared by several processes (the single-process side) ---------------------------------------

def test_shares_cover_a_batch_once_and_weight_the_loss_to_its_mean():
    for total in range(1, 9):
        for world in (2, 3, 4):
            shards = [shard_bounds(total, r, world) for r in range(world)]
            own = [s for s in shards if not s.padded]
            assert [i for s in own for i in range(s.offset, s.offset + s.count)] == list(range(total))
            assert max(s.count for s in own) - min(s.count for s in own) <= 1
            # mean of the scaled per-process means = the batch mean, for any per-item losses
            losses = torch.rand(total)
            scaled = [losses[s.offset:s.offset + s.count].mean() * s.loss_scale(world) for s in shards]
            torch.testing.assert_close(torch.stack(scaled).mean(), losses.mean())
    assert shard_bounds(1, 1, 2) == Shard(0, 1, 1, padded=True)


def test_a_process_builds_its_share_with_the_augmentations_of_the_whole_batch(tmp_path):
    from library.data import build_dataset_group, dataset_configs_from_args

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=5)
    args = parse([f"--train_data_dir={data}", "--resolution=64", "--caption_extension=.txt", "--train_batch_size=2",
                  "--flip_aug", "--random_crop", "--shuffle_caption", "--caption_dropout_rate=0.3"])
    whole = build_dataset_group(dataset_configs_from_args(args), seed=4)
    shared = build_dataset_group(dataset_configs_from_args(args), seed=4)
    prepare_group(shared, 3)  # batches of 3 x 2 images, each process building only its own 2
    whole.set_batch_scale(3)
    reference = whole.epoch_dataset(1)
    for i in range(len(reference)):
        batch = reference[i]
        for rank in range(3):
            part = take_shard(shared.epoch_dataset(1), i, rank, 3)
            assert part["shard"] == shard_bounds(len(batch["captions"]), rank, 3)
            expected = slice_batch(batch, rank, 3)
            assert part["captions"] == expected["captions"] and part["image_paths"] == expected["image_paths"]
            torch.testing.assert_close(part["images"], expected["images"])


def test_worker_processes_deliver_the_same_shares(tmp_path):
    from library.data import build_dataset_group, dataset_configs_from_args
    from library.data.loader import BatchFeeder

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=5)
    args = parse([f"--train_data_dir={data}", "--resolution=64", "--caption_extension=.txt", "--flip_aug"])
    group = prepare_group(build_dataset_group(dataset_configs_from_args(args), seed=2), 2)
    direct = group.epoch_dataset(1, 2)
    fed = list(BatchFeeder(group, 2, num_workers=1, rank=1, world=2).epoch(1, start=1))
    assert len(fed) == len(direct) - 1
    for i, batch in enumerate(fed, start=1):
        expected = take_shard(direct, i, 1, 2)
        assert batch["shard"] == expected["shard"] and batch["image_paths"] == expected["image_paths"]
        torch.testing.assert_close(batch["images"], expected["images"])


def test_noise_for_a_share_is_that_share_of_the_whole_batch_noise():
    import random

    from library.models.loading import make_noise_scheduler
    from library.training import diffusion
    from library.training.noise import drawing_for

    args = parse(["--noise_offset=0.1", "--multires_noise_iterations=2", "--ip_noise_gamma=0.1"])
    objective = diffusion.DiffusionObjective(args, make_noise_scheduler(), "cpu")
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    state = random.getstate()  # multires noise's level sizes come from Python's random
    whole = objective.noisy_latents(latents, torch.Generator().manual_seed(9))
    parts = []
    for rank in range(2):
        random.setstate(state)  # every process has the same Python RNG state
        shard = shard_bounds(5, rank, 2)
        with drawing_for(shard):
            parts.append(objective.noisy_latents(latents[shard.offset:shard.offset + shard.count],
                                                 torch.Generator().manual_seed(9)))
    for k in range(3):
        torch.testing.assert_close(torch.cat([p[k] for p in parts]), whole[k])


def test_ctrl_c_saves_a_state_says_how_to_resume_and_exits_130(tmp_path, capsys):
    import os
    import signal

    from library.logs import ProgressLogger
    from library.training.loop import run_training_or_exit

    acc = accelerator()
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.01))
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    steps = []

    def compute_loss(batch):
        steps.append(batch["ids"])
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C in the middle of the second step
        return (model(batch["x"]) - 0.5 * batch["x"]).pow(2).mean()

    cfg = LoopSettings(max_train_steps=10, num_epochs=10, gradient_accumulation_steps=1, max_grad_norm=0.0,
                       output_dir=tmp_path, output_name="m", seed=3)
    hooks = LoopHooks(compute_loss=compute_loss, save_model=lambda kind, epoch, step: tmp_path / "unused",
                      trainable=model)
    with pytest.raises(SystemExit) as exited:
        run_training_or_exit(acc, ToyGroup(3), optimizer, scheduler, hooks, cfg, torch.Generator().manual_seed(3),
                             ProgressLogger(acc), resume_latest=True)
    assert exited.value.code == 130 and len(steps) == 2  # the step in progress was finished, no more
    state = tmp_path / "m-interrupted-state"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    said = capsys.readouterr().out
    assert "stopped at step 2." in said and f'continue with --resume latest (or --resume "{state}")' in said

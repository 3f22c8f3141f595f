"""train_dual_unet.py and gen_pairs.py end to end on the tiny random model (plumbing, not learning)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.dual_unet import outputs, toy
from library.errors import UserError, run_cli


def run_train(argv):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_dual_unet

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return train_dual_unet.main(argv)


def base_argv(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--unet_lora_rank", "4", "--learning_rate", "1e-3",
            "--seed", "1", "--cache_latents", "--max_steps", "6", "--save_every_n_steps", "1",
            "--validate_every", "2", "--sample_every", "3", "--num_sample_pairs", "2", "--sample_steps", "2",
            *extra]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return toy.write_pair_dataset(tmp_path_factory.mktemp("pairs"), count=10, size=64)


@pytest.fixture(scope="module")
def run_a(tiny_model, pair_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out_a")
    result = run_train(base_argv(tiny_model.diffusers_dir, pair_data, out, "--name", "run_a", "--keep_last", "3",
                                 "--prompts", "a cf photo", "a fa photo"))
    return result


def test_run_folder_layout_logs_and_samples(run_a):
    run = run_a["run"]
    assert run.root.name == "run_a"
    train_rows = outputs.read_log(run.training_log)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite([r["loss"], r["mse_a"], r["mse_b"], r["hf"], r["struct"]]).all() for r in train_rows)
    val_rows = outputs.read_log(run.validation_log)
    assert [r["step"] for r in val_rows] == [0, 2, 4, 6]  # step 0 = the base alone
    for step in (3, 6):
        folder = run.samples(step)
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "pair_0000.png", "pair_0001.png"]
        assert Image.open(folder / "pair_0000.png").size == (2 * 64 + 2, 64)  # a | b
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.logs.iterdir()))).Reload()
    assert {"loss/mse_a", "loss/mse_b", "loss/struct", "val/loss", "lr/unet_cf", "lr/unet_fa"} <= set(events.Tags()["scalars"])
    assert "samples/pairs" in events.Tags()["images"]


def test_rolling_checkpoints_keep_exactly_three_with_loras_and_state(run_a):
    run = run_a["run"]
    assert [s for s, _ in run.latest_steps()] == [4, 5, 6]
    assert sorted(p.name for p in run.latest.iterdir()) == ["step_000004", "step_000005", "step_000006"]
    folder = run.checkpoint(6)
    assert {"cf.safetensors", "fa.safetensors", "dual_unet.json", "state"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "state" / "train_state.json").read_text())["global_step"] == 6
    from library.lora_tools.verify import verify_lora_file
    from library.training.metadata import read_metadata
    from networks.lora_format import read_weights

    for name in ("cf.safetensors", "fa.safetensors"):
        assert verify_lora_file(folder / name).ok
        meta = read_metadata(folder / name)
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
        assert meta["ss_steps"] == "6" and json.loads(meta["ss_training_comment"])["dual_unet"]["modality"] in name
    a, b = read_weights(folder / "cf.safetensors"), read_weights(folder / "fa.safetensors")
    assert a.keys() == b.keys() and all(k.startswith("lora_unet_") for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))  # two different LoRAs


def test_fixed_prompt_per_modality_is_used_and_recorded(run_a):
    dual = run_a["dual"]
    assert dual.prompts == ("a cf photo", "a fa photo") and not torch.equal(dual.hidden[0], dual.hidden[1])
    info = json.loads((run_a["run"].best / "dual_unet.json").read_text())
    assert info["prompts"] == ["a cf photo", "a fa photo"] and info["modalities"] == ["cf", "fa"]


def test_pairs_file_uncached_bf16_with_accumulation(tiny_model, pair_data, tmp_path):
    lines = [json.dumps({"id": f"p{i}", "cf": f"cf/{i:04d}.png", "fa": f"fa/{i:04d}.png",
                         "split": "val" if i < 2 else "train"}) for i in range(10)]
    (pair_data / "pairs.jsonl").write_text("\n".join(lines))
    argv = base_argv(tiny_model.diffusers_dir, pair_data, tmp_path, "--pairs_file", str(pair_data / "pairs.jsonl"),
                     "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "--max_steps", "2",
                     "--max_data_loader_n_workers", "0", "--sample_every", "0")
    argv.remove("--cache_latents")
    result = run_train(argv)
    assert result["state"].global_step == 2
    assert [r["step"] for r in outputs.read_log(result["run"].validation_log)] == [0, 2]
    assert (result["run"].checkpoint(2) / "fa.safetensors").is_file()


def test_best_checkpoint_follows_the_validation_loss(run_a):
    run = run_a["run"]
    rows = outputs.read_log(run.validation_log)
    best = min(rows, key=lambda r: r["val_loss"])
    info = json.loads((run.best / "dual_unet.json").read_text())
    assert info["step"] == best["step"] and info["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    running = float("inf")
    for row in rows:  # the "best" column marks exactly the new minima
        assert row["best"] == (row["val_loss"] < running)
        running = min(running, row["val_loss"])
    assert run_a["state"].extra["dual_unet"]["best_step"] == best["step"]


def test_resume_from_a_checkpoint_continues_exactly(run_a, tiny_model, pair_data, tmp_path):
    from networks.lora_format import read_weights

    start = run_a["run"].checkpoint(4)
    result = run_train(base_argv(tiny_model.diffusers_dir, pair_data, tmp_path, "--resume", str(start),
                                 "--prompts", "a cf photo", "a fa photo"))  # run_a's other arguments
    assert result["state"].global_step == 6
    for name in ("cf.safetensors", "fa.safetensors"):
        resumed = read_weights(result["run"].checkpoint(6) / name)
        straight = read_weights(run_a["run"].checkpoint(6) / name)
        assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)
    rows = outputs.read_log(result["run"].training_log)
    assert [r["step"] for r in rows] == [5, 6]


def _fake_state(folder, step):
    """A state folder as save_train_state writes it (its files complete), at `step`."""
    from library.training.checkpoint import STATE_VERSION

    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"version": STATE_VERSION, "global_step": step, "epoch": 0,
                                                         "next_batch": 0, "seed": 0, "max_train_steps": 20}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "trainable.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.save({}, folder / name)


def test_resume_latest_picks_the_newest_state(tmp_path):
    run = outputs.RunFolder(tmp_path, "r")
    for step in (2, 10, 7):
        _fake_state(run.checkpoint(step) / "state", step)
    assert outputs.resolve_resume("latest", run) == str(run.checkpoint(10) / "state")
    _fake_state(run.root / outputs.INTERRUPTED, 12)
    assert outputs.resolve_resume("latest", run) == str(run.root / outputs.INTERRUPTED)
    (run.root / outputs.INTERRUPTED / "optimizer.pt").write_bytes(b"")  # killed mid-save: skipped
    assert outputs.resolve_resume("latest", run) == str(run.checkpoint(10) / "state")
    assert outputs.resolve_resume(str(run.checkpoint(2)), run) == str(run.checkpoint(2) / "state")
    with pytest.raises(UserError, match="neither a checkpoint"):
        outputs.resolve_resume(str(tmp_path), run)


def test_gen_pairs_writes_a_paired_dataset_and_grid(run_a, tmp_path, capsys):
    import gen_pairs

    out = tmp_path / "gen"
    argv = ["--checkpoint_dir", str(run_a["run"].best), "--num_samples", "3", "--steps", "2", "--seed", "5",
            "--batch_size", "2", "--output_dir", str(out)]
    assert run_cli(gen_pairs.main, argv) == 0
    for sub in ("cf", "fa"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert (out / "grid.png").is_file() and (out / "pair_0002.png").is_file()
    assert json.loads((out / "generation.json").read_text())["seeds"] == [5, 6, 7]


def test_same_initial_noise_gives_identical_images_through_identical_unets(tiny_model):
    """With both LoRAs still zero the two UNets are the same function: pairs from shared noise are
    pixel-identical, pairs from independent noise are not. (Shared noise is what pairs rely on.)"""
    from library.dual_unet import model as model_mod
    from library.dual_unet.sampling import generate_pairs
    from library.models.loading import load_sd_model

    model = load_sd_model(tiny_model.diffusers_dir)
    dual = model_mod.attach(model, ("cf", "fa"), model_mod.new_networks(4, 4))
    a, b = generate_pairs(model, dual, [0, 1], resolution=64, steps=2)
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)
    a2, b2 = generate_pairs(model, dual, [0, 1], resolution=64, steps=2, independent=True)
    assert np.array_equal(a, a2) and not np.allclose(b, b2)


def test_user_errors(tiny_model, pair_data, tmp_path, capsys):
    import gen_pairs
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pair_data, broken)
    (broken / "fa" / "0003.png").unlink()
    assert run_cli(run_train, base_argv(tiny_model.diffusers_dir, broken, tmp_path / "o")) == 2
    assert "without a partner" in capsys.readouterr().err
    assert run_cli(run_train, base_argv(tiny_model.diffusers_dir, pair_data, tmp_path / "o", "--modalities", "cf", "CF")) == 2
    assert "two different names" in capsys.readouterr().err
    assert run_cli(gen_pairs.main, ["--checkpoint_dir", str(tmp_path)]) == 2
    assert "not a dual-UNet checkpoint" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))


# --- trainer automation under Lightning's names -------------------------------------------------------

def _parse(*argv):
    import train_dual_unet
    from library import args as A

    return A.parse_args(train_dual_unet.setup_parser(), ["--pretrained_model_name_or_path=x", *argv])


def test_lightning_names_are_aliases_of_the_flags():
    import train_dual_unet
    from library.training.accel import apply_precision_alias

    actions = train_dual_unet.setup_parser()._option_string_actions
    for alias, flag in {"--val_split": "--validation_split", "--log_images_every_n_steps": "--sample_every",
                        "--accumulate_grad_batches": "--gradient_accumulation_steps",
                        "--gradient_clip_val": "--max_grad_norm", "--resume_from_checkpoint": "--resume"}.items():
        assert actions[alias] is actions[flag], alias
    args = _parse("--val_split", "0.2", "--log_images_every_n_steps", "7", "--accumulate_grad_batches", "2",
                  "--gradient_clip_val", "0.5", "--resume_from_checkpoint", "latest", "--precision", "bf16-mixed",
                  "--save_top_k", "2", "--monitor", "val/struct", "--monitor_mode", "max", "--overfit_batches", "3")
    assert (args.validation_split, args.sample_every, args.gradient_accumulation_steps) == (0.2, 7, 2)
    assert (args.max_grad_norm, args.resume) == (0.5, "latest")
    assert (args.save_top_k, args.monitor, args.monitor_mode, args.overfit_batches) == (2, "val/struct", "max", 3)
    apply_precision_alias(args)  # what make_accelerator does
    assert args.mixed_precision == "bf16"
    assert _parse("--fast_dev_run").fast_dev_run == 2 and _parse("--fast_dev_run", "4").fast_dev_run == 4


def test_save_top_k_keeps_the_k_best_checkpoints_by_validation_loss_and_the_last(tiny_model, pair_data, tmp_path):
    result = run_train(base_argv(tiny_model.diffusers_dir, pair_data, tmp_path, "--max_steps", "4", "--validate_every",
                                 "1", "--save_every_n_steps", "100", "--sample_every", "0", "--save_top_k", "2"))
    run = result["run"]
    rows = [r for r in outputs.read_log(run.validation_log) if r["step"] > 0]  # step 0: the base, before training
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    best = sorted(rows, key=lambda r: r["val_loss"])[:2]
    index = json.loads((run.root / "dual_unet-top_k.json").read_text())
    assert (index["monitor"], index["k"]) == ("val/loss", 2)
    assert [e["step"] for e in index["best_first"]] == [r["step"] for r in best]
    assert [e["value"] for e in index["best_first"]] == pytest.approx([r["val_loss"] for r in best], rel=1e-5)
    top = run.root / outputs.TOP_K
    assert sorted(p.name for p in top.iterdir()) == sorted(f"step_{int(r['step']):06d}" for r in best)
    for e in index["best_first"]:  # whole checkpoints: both LoRAs, the info file and the state
        names = {p.name for p in (top / e["file"]).iterdir()}
        assert {"cf.safetensors", "fa.safetensors", "dual_unet.json", "state"} <= names
    assert [s for s, _ in run.latest_steps()] == [4]  # the last checkpoint, as always
    assert result["state"].extra["top_k"] == index["best_first"]


def test_fast_dev_run_trains_and_validates_but_writes_nothing(tiny_model, pair_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pair_data, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "out"
    argv = base_argv(tiny_model.diffusers_dir, data, out, "--name", "r", "--fast_dev_run", "--cache_latents_to_disk",
                     "--save_top_k", "1", "--sample_at_first", "--sample_every", "1", "--validate_every", "1",
                     "--profile")
    result = run_train(argv)
    assert result["state"].global_step == 2
    assert not out.exists()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no latent cache files either
    said = capsys.readouterr().out
    assert "fast_dev_run: validation val/loss" in said and "fast_dev_run: 2 training steps ran" in said


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tiny_model, pair_data, tmp_path, monkeypatch):
    from library.dual_unet import data as data_mod

    seen, real = [], data_mod.PairedGroup.make_batch

    def recording(group, indices):
        batch = real(group, indices)
        seen.append(list(batch["names"]))
        return batch

    monkeypatch.setattr(data_mod.PairedGroup, "make_batch", recording)
    # no validation pairs, so every batch made is a training batch; 10 pairs of 2: 5 batches per epoch
    argv = base_argv(tiny_model.diffusers_dir, pair_data, tmp_path, "--validation_split", "0", "--validate_every", "0",
                     "--sample_every", "0", "--save_every_n_steps", "100", "--max_data_loader_n_workers", "0",
                     "--overfit_batches", "2", "--max_steps", "6")
    result = run_train(argv)
    group, _ = data_mod.build_datasets(_parse(*argv[2:]))
    first_two = [[group.pairs[i].name for i in batch] for batch in group.batch_order(0, 1)[:2]]
    assert seen == first_two * 3
    assert (result["state"].global_step, result["state"].epoch) == (6, 3)

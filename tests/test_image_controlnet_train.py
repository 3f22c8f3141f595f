"""train_image_controlnet.py / infer_image_controlnet.py end to end on a tiny synthetic data folder:
checkpoints (weights-only), exact resume, the two-stage freeze, TensorBoard tags, curves, inference."""
from __future__ import annotations

import argparse
import glob
import json
import pickle

import pytest
import torch

from library.errors import UserError
from library.image_controlnet import toy

TAGS_SCALAR = ["Epoch/TrainLoss", "Epoch/TrainImageLoss", "Epoch/TrainPoseLoss", "Epoch/ValLoss",
               "Epoch/ValImageLoss", "Epoch/ValPSNR"]
TAGS_IMAGE = ["Images/Comparison", "Images/Sample_0"]
TAGS_HIST = ["Pose/Target", "Pose/Source", "Pose/Difference"]


def run_train(data, out, *extra, epochs=2):
    import train_image_controlnet as T

    argv = ["--data_dir", str(data), "--backbone", "small", "--image_size", "16", "--feature_dim", "32",
            "--batch_size", "4", "--num_workers", "0", "--epochs", str(epochs), "--lr", "3e-3",
            "--save_dir", str(out / "ck"), "--log_dir", str(out / "logs"), "--save_interval", "1",
            "--image_log_interval", "1", *extra]
    return T.main(argv)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("icn")
    data = toy.write_dataset(root / "data", train_identities=4, val_identities=2, views=3, size=16, seed=0)
    run_train(data, root / "a")
    return data, root


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_plain(value, where="checkpoint"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), f"{where}: {type(value)}"


def test_checkpoints_are_plain_and_complete(run_a):
    _, root = run_a
    ck = root / "a" / "ck"
    assert {p.name for p in ck.glob("*.pth")} == {"best_model.pth", "checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth"}
    state = _load(ck / "checkpoint_epoch_2.pth")
    _assert_plain(state)
    assert state["epoch"] == 2 and state["global_step"] == 6     # 12 pairs / 4 = 3 steps per epoch
    assert state["config"] == {"backbone": "small", "image_size": 16, "feature_dim": 32, "pose_dim": 3,
                               "num_control_layers": 3}
    assert {"optimizer", "scheduler", "scaler", "rng", "history", "best_val_loss"} <= set(state)
    assert len(state["history"]["val_psnr"]) == 2
    assert state["optimizer"]["param_groups"][0]["fused"] is True  # one AdamW kernel, as the other trainers


def test_tensorboard_tags_and_curve_pngs(run_a):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root = run_a
    acc = EventAccumulator(glob.glob(str(root / "a" / "logs" / "events.*"))[0], size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(TAGS_SCALAR) <= set(tags["scalars"]), tags["scalars"]
    assert set(TAGS_IMAGE) <= set(tags["images"]), tags["images"]
    assert set(TAGS_HIST) <= set(tags["histograms"]), tags["histograms"]
    assert [e.step for e in acc.Scalars("Epoch/ValPSNR")] == [1, 2]
    comparison = acc.Images("Images/Comparison")[-1]
    assert (comparison.width, comparison.height) == (3 * 16, 6 * 16)   # source, target, generated x 6 val pairs
    for name in ("training_curves_epoch_1.png", "training_curves_epoch_2.png", "final_training_curves.png"):
        with Image.open(root / "a" / "ck" / name) as img:
            assert img.size == (960, 420)


def test_resume_continues_exactly(run_a, capsys):
    data, root = run_a
    # resume the run after epoch 1, leaving out the model flags (they come from the checkpoint)
    import train_image_controlnet as T

    T.main(["--data_dir", str(data), "--batch_size", "4", "--num_workers", "0", "--epochs", "2", "--lr", "3e-3",
            "--save_dir", str(root / "c" / "ck"), "--log_dir", str(root / "c" / "logs"), "--save_interval", "1",
            "--resume", str(root / "a" / "ck" / "checkpoint_epoch_1.pth")])
    out = capsys.readouterr().out
    assert "model settings from the checkpoint: --backbone small --image_size 16 --feature_dim 32" in out
    assert "resumed from" in out and "after epoch 1" in out
    straight, resumed = _load(root / "a/ck/checkpoint_epoch_2.pth"), _load(root / "c/ck/checkpoint_epoch_2.pth")
    assert not (root / "c/ck/checkpoint_epoch_1.pth").exists()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for pid, st in straight["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][pid][name]))
    assert straight["scheduler"] == resumed["scheduler"]
    assert straight["history"] == resumed["history"] and straight["global_step"] == resumed["global_step"]


def test_freeze_generator_starts_a_stage_and_keeps_generator_bit_identical(run_a, capsys):
    data, root = run_a
    start = root / "a/ck/checkpoint_epoch_2.pth"
    run_train(data, root / "d", "--freeze_generator", "--resume", str(start), epochs=1)
    assert "new training stage" in capsys.readouterr().out
    before, after = _load(start), _load(root / "d/ck/checkpoint_epoch_1.pth")
    gen = [k for k in before["model"] if k.startswith("generator.")]
    assert gen and all(torch.equal(before["model"][k], after["model"][k]) for k in gen)
    assert not torch.equal(before["model"]["control.0.zero.weight"], after["model"]["control.0.zero.weight"])
    assert not torch.equal(before["model"]["encoder.blocks.0.0.weight"], after["model"]["encoder.blocks.0.0.weight"])
    assert after["trainable"] == {"freeze_generator": True, "freeze_backbone": False}


def test_resume_refuses_other_model_and_pickles(run_a, tmp_path):
    data, root = run_a
    with pytest.raises(UserError, match="--feature_dim 64"):
        run_train(data, tmp_path, "--feature_dim", "64", "--resume", str(root / "a/ck/best_model.pth"))
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"format": "image_controlnet", "x": argparse.Namespace(a=1)}, fh, protocol=2)
    with pytest.raises(UserError, match="refused"):
        run_train(data, tmp_path, "--resume", str(tmp_path / "evil.pth"))
    with pytest.raises(UserError, match="--num_control_layers 1 to 3"):
        run_train(data, tmp_path, "--num_control_layers", "4")


def test_amp_on_cpu_uses_bf16(run_a, tmp_path, capsys):
    data, _ = run_a
    run_train(data, tmp_path, "--use_amp", "--loss_type", "l1", epochs=1)
    assert "bf16 autocast" in capsys.readouterr().err
    state = _load(tmp_path / "ck/checkpoint_epoch_1.pth")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert torch.isfinite(torch.tensor(state["history"]["train_loss"])).all()


def test_backbone_weights_freeze_by_default_and_warn_without(tmp_path, capsys):
    from library.image_controlnet.backbones import SmallEncoder
    from library.image_controlnet.model import ModelConfig
    from library.image_controlnet.train import _prepare_model

    torch.save(SmallEncoder().state_dict(), tmp_path / "enc.pth")
    ns = lambda **kw: argparse.Namespace(**{"backbone_weights": None, "freeze_backbone": None, **kw})  # noqa: E731
    cfg = ModelConfig(backbone="small", image_size=16, feature_dim=32)
    assert _prepare_model(ns(backbone_weights=str(tmp_path / "enc.pth")), cfg, None)[1] is True
    assert _prepare_model(ns(backbone_weights=str(tmp_path / "enc.pth"), freeze_backbone=False), cfg, None)[1] is False
    assert _prepare_model(ns(), cfg, None)[1] is False
    _prepare_model(ns(), ModelConfig(backbone="resnet50", image_size=64, feature_dim=32), None)
    assert "NO PRETRAINED WEIGHTS" in capsys.readouterr().err


def test_inference_writes_images(run_a, tmp_path, capsys):
    from PIL import Image

    import infer_image_controlnet as I

    data, root = run_a
    ck = str(root / "a/ck/best_model.pth")
    source = str(data / "images/front/p0000.png")
    out = str(tmp_path / "o.png")
    assert I.main(["--checkpoint", ck, "--source_image", source, "--yaw", "20", "--output", out]) == 0
    with Image.open(tmp_path / "o.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    assert "pose head reads" in capsys.readouterr().out
    (tmp_path / "poses.json").write_text(json.dumps([[10, 0, 0], {"yaw": -10, "pitch": 5, "roll": 0}]))
    I.main(["--checkpoint", ck, "--source_image", source, "--pose_file", str(tmp_path / "poses.json"),
            "--output", str(tmp_path / "m.png")])
    assert (tmp_path / "m_000.png").is_file() and (tmp_path / "m_001.png").is_file()
    (tmp_path / "bad.txt").write_text("10 0\n")
    with pytest.raises(UserError, match="3 angles"):
        I.main(["--checkpoint", ck, "--source_image", source, "--pose_file", str(tmp_path / "bad.txt")])
    with pytest.raises(UserError, match="does not exist"):
        I.main(["--checkpoint", str(tmp_path / "none.pth"), "--source_image", source])


def test_unreadable_image_in_a_worker_is_one_clean_error(run_a, tmp_path):
    import shutil

    data, _ = run_a
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data/images/video/p0001_v0/00001.png").write_bytes(b"garbage")   # exists, so only decoding fails
    with pytest.raises(UserError) as err:
        run_train(tmp_path / "data", tmp_path, "--num_workers", "1", epochs=1)
    text = str(err.value)
    assert text.startswith("cannot read the image") and "00001.png" in text and "Traceback" not in text


# --- trainer automation under Lightning's names -------------------------------------------------------

def _parse(*argv):
    import train_image_controlnet as T
    from library import args as A
    from library.image_controlnet.argv import normalize_bare_pairs

    parser = T.setup_parser()
    return A.parse_args(parser, normalize_bare_pairs(parser, ["--data_dir", "d", *argv])[0])


def test_lightning_names_are_aliases_of_the_flags():
    import train_image_controlnet as T
    from library.image_controlnet import steps as S

    actions = T.setup_parser()._option_string_actions
    for alias, flag in {"--val_split": "--val_fraction", "--accumulate_grad_batches": "--gradient_accumulation_steps",
                        "--gradient_clip_val": "--max_grad_norm", "--resume_from_checkpoint": "--resume"}.items():
        assert actions[alias] is actions[flag], alias
    args = _parse("--val_split", "0.3", "--accumulate_grad_batches", "2", "--gradient_clip_val", "0.5",
                  "--resume_from_checkpoint", "c.pth", "--save_top_k", "2", "--monitor", "val_psnr",
                  "--monitor_mode", "max", "--overfit_batches", "3", "--log_every_n_steps", "5",
                  "--log_images_every_n_steps", "7", "--profile")
    assert (args.val_fraction, args.gradient_accumulation_steps, args.max_grad_norm) == (0.3, 2, 0.5)
    assert args.resume == "c.pth"
    assert (args.save_top_k, args.monitor, args.monitor_mode, args.overfit_batches) == (2, "val_psnr", "max", 3)
    assert (args.log_every_n_steps, args.log_images_every_n_steps, args.profile) == (5, 7, True)
    # the original guide's dash-less form takes the aliases, and a bare --fast_dev_run before another flag
    bare = _parse("val_split", "0.2", "accumulate_grad_batches", "4", "fast_dev_run", "epochs", "3")
    assert (bare.val_fraction, bare.gradient_accumulation_steps, bare.fast_dev_run, bare.epochs) == (0.2, 4, 2, 3)
    assert _parse("--fast_dev_run", "--epochs", "3").fast_dev_run == 2 and _parse("fast_dev_run", "5").fast_dev_run == 5
    # a bare name is the flag as written (not the last spelling of its action, --no-freeze_backbone)
    assert _parse("freeze_backbone").freeze_backbone is True and _parse("no-freeze_backbone").freeze_backbone is False
    cpu = torch.device("cpu")
    assert S.amp_dtype(_parse("--precision", "bf16-mixed"), cpu) == torch.bfloat16
    assert S.amp_dtype(_parse("--mixed_precision", "bf16"), cpu) == torch.bfloat16
    assert S.amp_dtype(_parse(), cpu) is None and S.amp_dtype(_parse("--use_amp"), cpu) == torch.bfloat16
    with pytest.raises(UserError, match="--precision 32"):
        S.amp_dtype(_parse("--use_amp", "--precision", "32"), cpu)
    with pytest.raises(UserError, match="--precision 16-mixed"):
        S.amp_dtype(_parse("--precision", "16-mixed", "--mixed_precision", "bf16"), cpu)


@pytest.fixture
def recorded(monkeypatch):
    """Every compute_losses call of a run: (training?, dtype of the generated images)."""
    from library.image_controlnet import steps as S

    calls, real = [], S.compute_losses

    def spy(model, batch, *a, **k):
        out = real(model, batch, *a, **k)
        calls.append((model.training, out[3].dtype))
        return out

    monkeypatch.setattr(S, "compute_losses", spy)
    return calls


@pytest.mark.parametrize("flags, warning", [(["--mixed_precision", "bf16"], None),
                                            (["--precision", "bf16-mixed"], None),
                                            (["--use_amp"], "--use_amp without a CUDA GPU: training uses bf16")])
def test_mixed_precision_bf16_runs_under_bf16_autocast_like_use_amp(run_a, tmp_path, recorded, monkeypatch, capsys,
                                                                     flags, warning):
    from library import logs

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(logs, "_warned", set())  # warn_once: once per process
    data, _ = run_a
    run_train(data, tmp_path, *flags, epochs=1)
    assert recorded and {dtype for _, dtype in recorded} == {torch.bfloat16}
    err = capsys.readouterr().err
    assert (warning in err) if warning else "warning: --use_amp" not in err
    state = _load(tmp_path / "ck/checkpoint_epoch_1.pth")
    assert state["scaler"] == {}  # no fp16 loss scaling for bf16
    assert torch.isfinite(torch.tensor(state["history"]["train_loss"])).all()


def test_fp32_by_default_and_fp16_without_cuda_falls_back_with_a_warning(run_a, tmp_path, recorded, monkeypatch,
                                                                         capsys):
    from library import logs

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(logs, "_warned", set())
    data, _ = run_a
    run_train(data, tmp_path / "a", "--mixed_precision", "fp16", epochs=1)
    assert "--mixed_precision=fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert {dtype for _, dtype in recorded} == {torch.float32}


@pytest.mark.parametrize("monitor, mode", [("val_loss", "min"), ("val_psnr", "max")])
def test_save_top_k_keeps_exactly_the_k_best_checkpoints_and_the_last(run_a, tmp_path, capsys, monitor, mode):
    data, _ = run_a
    run_train(data, tmp_path, "--save_top_k", "2", "--monitor", monitor, "--monitor_mode", mode,
              "--save_interval", "100", epochs=4)
    ck = tmp_path / "ck"
    values = _load(ck / "checkpoint_epoch_4.pth")["history"][monitor]
    order = sorted(range(4), key=lambda i: values[i], reverse=mode == "max")[:2]
    kept = [i + 1 for i in order]  # epochs, best first
    assert {p.name for p in ck.glob("*.pth")} == {"best_model.pth", "checkpoint_epoch_4.pth",
                                                  *(f"top_epoch_{e}.pth" for e in kept)}
    index = json.loads((ck / "top_k.json").read_text())
    assert (index["monitor"], index["mode"], index["k"]) == (monitor, mode, 2)
    assert [e["epoch"] for e in index["best_first"]] == kept
    assert [e["value"] for e in index["best_first"]] == pytest.approx([values[i] for i in order])
    for e in index["best_first"]:  # each is a whole checkpoint of its epoch
        assert _load(ck / e["file"])["epoch"] == e["epoch"]
    assert _load(ck / "checkpoint_epoch_4.pth")["top_k"] == index["best_first"]  # a resumed run goes on with it
    assert "top 2 by " + monitor in capsys.readouterr().out


def test_save_top_k_with_an_unknown_monitor_is_a_user_error(run_a, tmp_path):
    data, _ = run_a
    with pytest.raises(UserError, match="--monitor val_los is not a metric") as err:
        run_train(data, tmp_path, "--save_top_k", "1", "--monitor", "val_los", epochs=1)
    assert "val_loss" in err.value.fix


def test_fast_dev_run_trains_and_validates_a_few_batches_and_writes_nothing(run_a, tmp_path, recorded, capsys):
    data, _ = run_a
    run_train(data, tmp_path, "--fast_dev_run", "--save_top_k", "1", "--profile", "--log_every_n_steps", "1",
              "--log_images_every_n_steps", "1", epochs=5)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()
    assert [training for training, _ in recorded] == [True, True, False, False]  # 2 steps, 2 validation batches
    out = capsys.readouterr().out
    assert "fast_dev_run: validation val_loss" in out and "fast_dev_run: 2 training steps ran; nothing was saved" in out


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(run_a, tmp_path, recorded, monkeypatch):
    from library.image_controlnet import steps as S

    planned, real_loader = [], S.DataLoader

    def spy(*a, batch_sampler=None, **k):  # train_epoch's loader takes the epoch's batches as batch_sampler
        if batch_sampler is not None:
            planned.append([list(b) for b in batch_sampler])
        return real_loader(*a, batch_sampler=batch_sampler, **k)

    monkeypatch.setattr(S, "DataLoader", spy)
    data, _ = run_a
    run_train(data, tmp_path, "--overfit_batches", "2", epochs=3)
    first_two = [indices for indices, _ in S.rank_batches(12, 4, 1, 0, 42, 0)[:2]]  # 12 training pairs, seed 42
    assert planned == [first_two] * 3
    assert [training for training, _ in recorded].count(True) == 6
    assert _load(tmp_path / "ck/checkpoint_epoch_3.pth")["global_step"] == 6


def test_profile_writes_a_trace_and_prints_a_summary(run_a, tmp_path, capsys):
    data, _ = run_a
    run_train(data, tmp_path, "--profile", epochs=3)  # 9 optimizer steps: steps 3-7 are traced
    trace = json.loads((tmp_path / "ck" / "profile_trace.json").read_text())
    assert trace["traceEvents"]
    out = capsys.readouterr().out
    assert "profile of steps 3-7:" in out and "Self CPU" in out


def test_step_logging_and_images_every_n_steps(run_a, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, _ = run_a
    run_train(data, tmp_path, "--log_every_n_steps", "2", "--log_images_every_n_steps", "3", epochs=2)  # 6 steps
    acc = EventAccumulator(glob.glob(str(tmp_path / "logs" / "events.*"))[0], size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("Step/TrainLoss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("Step/LR")] == [2, 4, 6]
    # optimizer steps, in place of the epoch schedule of --image_log_interval
    assert [e.step for e in acc.Images("Images/Comparison")] == [3, 6]

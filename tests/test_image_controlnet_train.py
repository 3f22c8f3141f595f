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

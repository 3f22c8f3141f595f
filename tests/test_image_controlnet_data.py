"""ImageControlNet data: pose convention, pose from keypoints, the four files, the validator, argv."""
from __future__ import annotations

import json

import numpy as np
import pytest

from library.errors import UserError
from library.image_controlnet import toy
from library.image_controlnet.data import load_pairs, scan
from library.image_controlnet.pose import (FACE_MODEL_5PT, euler_from_rotation, pose_from_keypoints, project,
                                           rotation_matrix)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy.write_dataset(tmp_path_factory.mktemp("toy") / "data", train_identities=4, val_identities=2,
                             views=3, size=16, seed=0, drop_pose_every=4)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_rotation_round_trip_and_sign_convention():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pose = rng.uniform([-80, -60, -80], [80, 60, 80])
        np.testing.assert_allclose(euler_from_rotation(rotation_matrix(*pose)), pose, atol=1e-9)
    def nose_from_eyes(pose):  # the nose relative to the midpoint of the eyes, image pixels
        kp = project(FACE_MODEL_5PT, pose, (50, 50), 1.0)
        return kp[2] - kp[:2].mean(0) - (FACE_MODEL_5PT[2, :2] - FACE_MODEL_5PT[:2, :2].mean(0)) * [1, -1]

    assert nose_from_eyes((30, 0, 0))[0] > 5     # yaw > 0: the nose moves to the image's right
    assert nose_from_eyes((0, 20, 0))[1] < -5    # pitch > 0: the nose moves up (image y grows downwards)
    left, right = project(FACE_MODEL_5PT, (0, 0, 20), (50, 50), 1.0)[:2]
    assert right[1] < left[1] - 1                # roll > 0: counter-clockwise, the right eye rises


def test_pose_from_keypoints_recovers_the_pose():
    rng = np.random.default_rng(1)
    for _ in range(10):
        pose = toy.random_pose(rng)
        np.testing.assert_allclose(pose_from_keypoints(toy.keypoints(pose, 64), toy.TOY_MODEL), pose, atol=1e-6)
        np.testing.assert_allclose(pose_from_keypoints(project(FACE_MODEL_5PT, pose, (56, 56), 0.9)), pose, atol=1e-6)
    with pytest.raises(ValueError):
        pose_from_keypoints(np.zeros((5, 2)))


def test_toy_folder_loads_into_pairs_with_splits_and_derived_poses(toy_dir):
    report = load_pairs(toy_dir)
    assert len(report.pairs) == 6 * 3
    assert {p.split for p in report.pairs if p.identity in ("p0004", "p0005")} == {"val"}
    assert sum(p.split == "train" for p in report.pairs) == 12
    meta = json.loads((toy_dir / "video_metadata.json").read_text())
    assert "pose" not in meta["items"][0] and meta["keypoint_model"]
    # the pose of item 0 was estimated from its keypoints: compare with what the renderer used
    kp = np.load(toy_dir / "video_keypoints.npy")
    derived = report.pairs[0].target_pose
    np.testing.assert_allclose(project(toy.TOY_MODEL, derived, (8, 8), toy.HEAD_RADIUS * 8), kp[0], atol=1e-3)
    assert all(p.source.name == f"{p.identity}.png" for p in report.pairs)


def test_split_by_identity_when_metadata_has_none(toy_dir, tmp_path):
    data = _copy(toy_dir, tmp_path / "d")
    meta = json.loads((data / "video_metadata.json").read_text())
    for item in meta["items"]:
        item.pop("split")
    (data / "video_metadata.json").write_text(json.dumps(meta))
    pairs = scan(data, val_fraction=0.34, seed=3).pairs
    val_ids = {p.identity for p in pairs if p.split == "val"}
    assert len(val_ids) == 2 and not val_ids & {p.identity for p in pairs if p.split == "train"}


def test_validator_lists_every_problem(toy_dir, tmp_path):
    data = _copy(toy_dir, tmp_path / "d")
    meta = json.loads((data / "video_metadata.json").read_text())
    meta["items"][1]["pose"] = [1.0, "x"]
    meta["items"][2]["image"] = "images/nowhere.png"
    meta["items"][4].pop("pose", None)
    meta["items"][4]["index"] = 999                                # no keypoints row, no pose
    meta["items"][5]["identity"] = "stranger"                      # no front image
    (data / "video_metadata.json").write_text(json.dumps(meta))
    (data / "images/front/p0001.png").write_bytes(b"not a png")     # only the image check sees this
    problems = scan(data).problems
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "item 1" in text and "3 finite numbers" in text
    assert "nowhere.png does not exist" in text
    assert "item 4" in text and "999" in text
    assert "stranger" in text
    full = scan(data, check_images=True).problems
    assert any("p0001.png cannot be read" in p for p in full)
    with pytest.raises(UserError, match="--check_data"):
        load_pairs(data)


def test_validator_missing_and_broken_files(toy_dir, tmp_path):
    data = _copy(toy_dir, tmp_path / "d")
    (data / "front_metadata.json").write_text("{not json")
    (data / "video_keypoints.npy").unlink()
    problems = scan(data).problems
    assert any("front_metadata.json is not valid JSON" in p for p in problems)
    assert any("video_keypoints.npy is missing" in p for p in problems)   # needed: some items lack a pose
    assert scan(tmp_path / "nothing").problems == [f"the data folder {tmp_path / 'nothing'} does not exist."]


def test_check_data_command(toy_dir, tmp_path, capsys):
    import train_image_controlnet as T

    assert T.main(["--data_dir", str(toy_dir), "--check_data"]) == 0
    assert "no problems found" in capsys.readouterr().out
    data = _copy(toy_dir, tmp_path / "d")
    (data / "images/front/p0002.png").unlink()
    assert T.main(["--data_dir", str(data), "--check_data"]) == 1
    assert "p0002.png does not exist" in capsys.readouterr().err


def test_seed_style_bare_arguments():
    import train_image_controlnet as T
    from library.image_controlnet.argv import normalize_bare_pairs

    parser = T.setup_parser()
    argv, converted = normalize_bare_pairs(parser, "data_dir d epochs 100 batch_size=16 lr 1e-4 use_amp".split())
    assert argv == ["--data_dir", "d", "--epochs", "100", "--batch_size", "16", "--lr", "1e-4", "--use_amp"]
    assert converted == ["data_dir", "epochs", "batch_size", "lr", "use_amp"]
    # values of real flags are never reinterpreted, even when they look like option names
    assert normalize_bare_pairs(parser, ["--save_dir", "epochs", "freeze_generator", "false"])[0] == \
        ["--save_dir", "epochs"]
    with pytest.raises(UserError, match="--data_dir"):
        normalize_bare_pairs(parser, ["dat_dir", "x"])
    with pytest.raises(UserError, match="no value"):
        normalize_bare_pairs(parser, ["data_dir"])


def test_missing_data_dir_and_config_file(toy_dir, tmp_path, capsys):
    import train_image_controlnet as T

    with pytest.raises(UserError, match="--data_dir is required"):
        T.main([])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{toy_dir}"\ncheck_data = true\n[model]\nbackbone = "small"\n')
    assert T.main(["--config_file", str(cfg)]) == 0     # the config's data_dir reached the check
    assert str(toy_dir) in capsys.readouterr().out
    cfg.write_text("epoch = 3\n")  # ignored as kohya ignores unknown keys, and named with the likely flag
    with pytest.raises(UserError, match="--data_dir is required"):
        T.main(["--config_file", str(cfg)])
    assert "epoch (did you mean 'epochs'?)" in capsys.readouterr().err


def test_image_dir_holds_the_images(toy_dir, tmp_path):
    import shutil

    data = _copy(toy_dir, tmp_path / "d")
    (tmp_path / "pictures").mkdir()
    shutil.move(str(data / "images"), str(tmp_path / "pictures" / "images"))
    assert any("does not exist" in p for p in scan(data).problems)
    pairs = load_pairs(data, tmp_path / "pictures").pairs
    assert len(pairs) == 18 and all(str(p.target).startswith(str(tmp_path / "pictures")) for p in pairs)
    assert "--image_dir" in scan(data, tmp_path / "elsewhere").problems[0]


def test_best_match_check_is_exact_on_true_renders():
    """The pose check of the learning test finds the true angle of a ground-truth render (grid 2.5 deg)."""
    rng = np.random.default_rng(5)
    for _ in range(3):
        ident, pose = toy.random_identity(rng, "x"), toy.random_pose(rng)
        found = toy.best_match_angles(ident, toy.render(ident, pose, 32), pose)
        assert np.all(np.abs(found - np.array(pose)) <= 1.25 + 1e-6), (found, pose)
        # it looks at the image, not at the target: the frontal render is not read as the target pose
        front = toy.best_match_angles(ident, toy.render(ident, (0, 0, 0), 32), pose)
        assert np.abs(front - np.array(pose)).mean() > 5, (front, pose)

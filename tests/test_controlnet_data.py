"""Conditioning datasets: listings and parallel folders, conditions aligned with the training crop,
validation splits, and the input checks that run before any model is loaded."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from library.errors import UserError
from tests.controlnet_support import disk_image, radar_listing


def _args(*flags):
    import train_controlnet
    from library.controlnet.config import parse_args

    return parse_args(train_controlnet.setup_parser(), ["--pretrained_model_name_or_path", "m",
                                                        "--output_dir", "o", *flags])


def test_radar_condition_peaks_on_the_object_after_bucketing(tmp_path):
    from library.controlnet.data import build_datasets

    items = [((96, 64), (70, 20)), ((64, 96), (12, 80)), ((64, 64), (33, 40))]
    root = radar_listing(tmp_path / "radar", items)
    args = _args("--train_data_dir", str(root), "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
                 "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--heatmap_sigma", "2")
    train, val, ctype = build_datasets(args, seed=0)
    assert ctype.name == "radar_heatmap" and val is None  # auto: the listing has targets
    seen = 0
    for batch in train.epoch_dataset(0, 0):
        cond = batch["controlnet_cond"]
        assert cond.shape[1] == 3 and cond.shape[-2:] == batch["images"].shape[-2:]
        for image, heat in zip(batch["images"], cond):
            red = (image[0] - image[1]).numpy()  # the disk, in the cropped training image
            ys, xs = np.nonzero(red > 1.0)
            peak = np.unravel_index(int(heat[0].argmax()), heat[0].shape)
            assert abs(peak[0] - ys.mean()) <= 1.0 and abs(peak[1] - xs.mean()) <= 1.0
            assert heat.max().item() == pytest.approx(1.0, abs=0.05)
            seen += 1
    assert seen == 3


def test_validation_images_come_from_the_listing_or_the_split(tmp_path):
    from library.controlnet.data import build_datasets

    root = radar_listing(tmp_path / "radar", [((64, 64), (10 + 5 * i, 30)) for i in range(8)], val=(6, 7))
    train, val, _ = build_datasets(_args("--train_data_dir", str(root), "--resolution", "64"), seed=0)
    assert len(train.images) == 6 and sorted(r.path[-5:] for r in val.images) == ["6.png", "7.png"]
    lines = (root / "metadata.jsonl").read_text().replace('"val"', '"train"')
    (root / "metadata.jsonl").write_text(lines)
    train, val, _ = build_datasets(_args("--train_data_dir", str(root), "--resolution", "64",
                                         "--validation_split", "0.25"), seed=3)
    assert (len(train.images), len(val.images)) == (6, 2)
    assert not {r.path for r in train.images} & {r.path for r in val.images}


def test_kohya_folders_with_a_conditioning_folder(tmp_path):
    from library.controlnet.data import build_datasets

    images, conds = tmp_path / "train" / "2_thing", tmp_path / "cond"
    images.mkdir(parents=True)
    conds.mkdir()
    for i in range(3):
        img = disk_image(images / f"a{i}.png", (64, 64), (20 + 10 * i, 30))
        (images / f"a{i}.txt").write_text(f"caption {i}")
        Image.fromarray(255 - img).save(conds / f"a{i}.png")  # a condition we can recognise: the negative
    args = _args("--train_data_dir", str(tmp_path / "train"), "--conditioning_data_dir", str(conds),
                 "--resolution", "64", "--conditioning_type", "image", "--train_batch_size", "2")
    train, _, ctype = build_datasets(args, seed=0)
    assert ctype.name == "image" and train.num_batches_per_epoch == 3  # 3 images x 2 repeats, batch 2
    for batch in train.epoch_dataset(0, 0):
        pixels = batch["images"] / 2 + 0.5  # [-1, 1] -> [0, 1]
        assert batch["controlnet_cond"].shape == pixels.shape
        assert np.allclose(batch["controlnet_cond"].numpy(), 1 - pixels.numpy(), atol=1 / 255 + 1e-6)
        assert all(c.startswith("caption") for c in batch["captions"])


def test_input_problems_stop_before_training(tmp_path):
    from library.controlnet.data import build_datasets

    images, conds = tmp_path / "train", tmp_path / "cond"
    images.mkdir()
    conds.mkdir()
    disk_image(images / "x.png", (64, 64), (30, 30))
    disk_image(images / "y.png", (64, 64), (30, 30))
    disk_image(conds / "x.png", (64, 64), (30, 30))
    base = ["--train_data_dir", str(images), "--conditioning_data_dir", str(conds), "--resolution", "64"]
    with pytest.raises(UserError, match="y.png has no conditioning image"):
        build_datasets(_args(*base), seed=0)
    with pytest.raises(UserError, match="--flip_aug"):
        build_datasets(_args(*base, "--flip_aug"), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "train/x.png", "targets": [{"range": 1}]}\n')
    with pytest.raises(UserError, match="bad target"):
        build_datasets(_args("--train_listing", str(bad), "--resolution", "64"), seed=0)
    bad.write_text('{"file_name": "train/x.png"}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        build_datasets(_args("--train_listing", str(bad), "--resolution", "64"), seed=0)


def test_toml_listing_and_outside_targets_warning(tmp_path, capsys):
    from library.controlnet.data import build_datasets

    disk_image(tmp_path / "a.png", (64, 64), (30, 30))
    (tmp_path / "list.toml").write_text(
        '[[items]]\nfile_name = "a.png"\ntext = "a target"\n'
        'targets = [{range = 100.0, velocity = 0.0}, {range = 500.0, velocity = 0.0}]\n')
    train, _, ctype = build_datasets(_args("--train_listing", str(tmp_path / "list.toml"), "--resolution", "64",
                                           "--range_max", "200"), seed=0)
    assert ctype.name == "radar_heatmap" and len(train.images) == 1
    assert "1 target(s) in 1 image(s) lie outside range" in capsys.readouterr().err

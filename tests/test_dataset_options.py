"""kohya's dataset options, one family per section: caption ops, caption dropout, augmentations,
regularization images, dataset-config keys, fine-tuning metadata (--in_json), DataLoader workers."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import build_dataset_group, dataset_configs_from_args
from library.data.config import SubsetConfig
from library.data.loader import BatchFeeder
from library.data.transforms import process_caption
from library.errors import UserError
from tests.data_helpers import make_args, make_folder, make_image


def build(args, **kw):
    return build_dataset_group(dataset_configs_from_args(args), seed=args.seed, **kw)


def captions_over(subset: SubsetConfig, caption: str, n: int = 40, epoch: int = 0) -> list[str]:
    return [process_caption(caption, subset, np.random.default_rng([7, i]), epoch) for i in range(n)]


# --- caption ops: keep_tokens, separators -------------------------------------------------------

def test_keep_tokens_separator_fixes_head_and_tail():
    sub = SubsetConfig("x", shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    outs = captions_over(sub, "sks, girl ||| red, blue, green, hat ||| best quality")
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "girl"] and tags[-1] == "best quality"  # keep_tokens is ignored
        assert sorted(tags[2:-1]) == ["blue", "green", "hat", "red"] and "|||" not in out
    assert len(set(outs)) > 1
    # Without shuffling the marker is still removed: it is markup, not text to train on.
    plain = SubsetConfig("x", keep_tokens_separator="|||")
    assert process_caption("a, b ||| c ||| d", plain, None) == "a, b, c, d"
    # A caption without the marker falls back to keep_tokens.
    sub = SubsetConfig("x", shuffle_caption=True, keep_tokens=2, keep_tokens_separator="|||")
    assert all(o.startswith("a, b, ") for o in captions_over(sub, "a, b, c, d, e"))


def test_caption_separator_and_secondary_separator():
    sub = SubsetConfig("x", shuffle_caption=True, caption_separator=";")
    outs = captions_over(sub, "a cat; on a mat, sleeping; blue")
    # Split at ";" only (the comma stays inside its tag), joined with ", " as kohya does.
    assert all("on a mat, sleeping" in o and sorted(o.split(", ")) == ["a cat", "blue", "on a mat", "sleeping"]
               for o in outs) and len(set(outs)) > 1
    # Tags joined by the secondary separator move (and drop) together, then read as normal tags.
    sub = SubsetConfig("x", shuffle_caption=True, secondary_separator=";;;")
    outs = captions_over(sub, "a, b;;;c, d, e")
    assert all("b,c" in o and ";;;" not in o for o in outs) and len(set(outs)) > 1
    assert process_caption("x;;;y", SubsetConfig("x", secondary_separator=";;;"), None) == "x,y"


def test_prefix_and_suffix_join_the_caption_before_tag_ops():
    sub = SubsetConfig("x", caption_prefix="pre,", caption_suffix=", post", shuffle_caption=True,
                       keep_tokens=1)
    for out in captions_over(sub, "a, b, c"):
        tags = out.split(", ")
        assert tags[0] == "pre" and sorted(tags[1:]) == ["a", "b", "c", "post"]
    assert process_caption("a, b", SubsetConfig("x", caption_prefix="pre"), None) == "pre a, b"


# --- caption dropout ------------------------------------------------------------------------------

def test_caption_dropout_rate_drops_whole_captions():
    assert set(captions_over(SubsetConfig("x", caption_dropout_rate=1.0), "a, b")) == {""}
    outs = captions_over(SubsetConfig("x", caption_dropout_rate=0.5), "a, b", n=200)
    assert set(outs) == {"", "a, b"} and 60 < outs.count("") < 140
    # The prefix goes with it (kohya drops the prefixed caption).
    assert set(captions_over(SubsetConfig("x", caption_dropout_rate=1.0, caption_prefix="p"), "a")) == {""}


def test_caption_dropout_every_n_epochs_counts_epochs_from_one():
    sub = SubsetConfig("x", caption_dropout_every_n_epochs=2)
    # 0-based epochs 1 and 3 are kohya's epochs 2 and 4.
    assert [process_caption("a", sub, np.random.default_rng(0), e) for e in range(4)] == ["a", "", "a", ""]


def test_caption_tag_dropout_keeps_fixed_tags():
    sub = SubsetConfig("x", caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert set(captions_over(sub, "sks, a, b, c")) == {"sks"}
    sub = SubsetConfig("x", caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = captions_over(sub, "sks, a, b, c, d, e, f", n=100)
    lengths = [len(o.split(", ")) - 1 for o in outs]
    assert all(o.startswith("sks") for o in outs) and 2 < sum(lengths) / len(lengths) < 4
    for o in outs:  # no shuffle: the kept tags stay in order
        kept = o.split(", ")[1:]
        assert kept == sorted(kept)


def test_caption_ops_flags_reach_batches_and_resume_exactly(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "4_x", n=3, caption_ext=".caption",
                captions=["sks ||| a, b, c, d", "sks ||| e, f, g", "sks ||| h, i;j, k"])
    args = make_args(train_data_dir=str(train), train_batch_size=2, shuffle_caption=True,
                     keep_tokens_separator="|||", secondary_separator=";", caption_dropout_rate=0.3,
                     caption_tag_dropout_rate=0.2, caption_dropout_every_n_epochs=3, flip_aug=True)
    group = build(args)
    seen = Counter()
    for epoch in range(3):
        full = group.epoch_dataset(epoch, 0)
        resumed = group.epoch_dataset(epoch, 0, start=2)
        for i in range(len(resumed)):
            assert full[2 + i]["captions"] == resumed[i]["captions"]
        for batch in full:
            for c in batch["captions"]:
                seen["empty" if not c else "kept"] += 1
                assert not c or (c.startswith("sks") and "|||" not in c and ";" not in c)
        if epoch == 2:  # kohya's epoch 3: every caption dropped
            assert all(c == "" for b in full for c in b["captions"])
    assert seen["empty"] > 12 and seen["kept"] > 5  # the 12 of epoch 3 plus random ones


def test_dataset_ops_never_touch_the_global_rng(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "2_x", n=2, size=(48, 32), caption_ext=".caption", captions=["a, b, c", "d, e, f"])
    group = build(make_args(train_data_dir=str(train), shuffle_caption=True, caption_dropout_rate=0.5,
                            caption_tag_dropout_rate=0.5, flip_aug=True, color_aug=True, random_crop=True))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.random(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    for batch in group.epoch_dataset(0, 0):
        pass
    assert (random.random(), np.random.random(), torch.rand(1)) == expected


# --- augmentations ------------------------------------------------------------------------------

def _asymmetric_image(path, size=(32, 32)):
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4] = (250, 20, 20)  # red on the left only
    arr[: h // 2, :, 1] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _pixels(t: torch.Tensor) -> np.ndarray:
    return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_flip_aug_mirrors_about_half(tmp_path):
    arr = _asymmetric_image(tmp_path / "t" / "1_x" / "a.png")
    group = build(make_args(train_data_dir=str(tmp_path / "t"), resolution="32", flip_aug=True))
    kinds = Counter()
    for epoch in range(30):
        img = _pixels(group.epoch_dataset(epoch, 0)[0]["images"][0])
        kinds["plain" if np.array_equal(img, arr) else "flipped" if np.array_equal(img, arr[:, ::-1]) else "?"] += 1
    assert kinds["?"] == 0 and kinds["plain"] > 5 and kinds["flipped"] > 5
    plain = build(make_args(train_data_dir=str(tmp_path / "t"), resolution="32"))
    assert np.array_equal(_pixels(plain.epoch_dataset(3, 0)[0]["images"][0]), arr)


def test_random_crop_moves_the_window(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    (tmp_path / "t" / "1_x").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "t" / "1_x" / "a.png")
    windows = {left: arr[:, left:left + 32] for left in range(33)}

    def lefts(**kw):
        group = build(make_args(train_data_dir=str(tmp_path / "t"), resolution="32", **kw))
        found = []
        for epoch in range(12):
            img = _pixels(group.epoch_dataset(epoch, 0)[0]["images"][0])
            found.append(next(k for k, w in windows.items() if np.array_equal(img, w)))
        return found

    assert set(lefts()) == {16}                      # centre crop
    assert len(set(lefts(random_crop=True))) > 3     # random windows of the same image


def test_color_aug_changes_a_third_of_images_slightly(tmp_path):
    arr = np.random.default_rng(1).integers(40, 200, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "t" / "1_x").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "t" / "1_x" / "a.png")
    group = build(make_args(train_data_dir=str(tmp_path / "t"), resolution="32", color_aug=True))
    changed = 0
    for epoch in range(60):
        img = _pixels(group.epoch_dataset(epoch, 0)[0]["images"][0])
        if not np.array_equal(img, arr):
            changed += 1
            assert img.shape == arr.shape and np.abs(img.astype(int) - arr).mean() < 40
    assert 8 <= changed <= 35  # kohya: p = 0.33


def test_latent_caching_refused_names_each_augmentation(tmp_path):
    make_folder(tmp_path / "t", "1_x", n=1)
    for flag in ("color_aug", "random_crop"):
        group = build(make_args(train_data_dir=str(tmp_path / "t"), **{flag: True}))
        with pytest.raises(UserError, match=flag):
            group.check_caching_allowed()


# --- regularization images --------------------------------------------------------------------------

def test_reg_images_count_with_repeats_and_weights(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_folder(train, "3_sks dog", n=2, caption_ext=".caption")
    make_folder(reg, "2_dog", n=2, seed=40)
    group = build(make_args(train_data_dir=str(train), reg_data_dir=str(reg), prior_loss_weight=0.25))
    assert group.num_train_images == 6 and group.num_reg_images == 4  # kohya: files x repeats
    assert sorted(r.repeats for r in group.images if r.is_reg) == [3, 3]  # balanced to the 6 train uses
    assert group.metadata()["ss_num_reg_images"] == "4"
    weights = {p: w for b in group.epoch_dataset(0, 0) for p, w in zip(b["image_paths"], b["loss_weights"].tolist())}
    assert sorted(set(weights.values())) == [0.25, 1.0]
    reg_captions = {c for b in group.epoch_dataset(0, 0) for c, p in zip(b["captions"], b["image_paths"])
                    if "/reg/" in p}
    assert reg_captions == {"dog"}  # the class token


# --- dataset config keys ----------------------------------------------------------------------------

def test_toml_caption_keys_at_every_level(tmp_path):
    a = make_folder(tmp_path, "a", n=1, caption_ext=".txt", captions=["x ||| y, z"])
    b = make_folder(tmp_path, "b", n=1, seed=5)
    path = tmp_path / "d.toml"
    path.write_text(f"""
[general]
caption_dropout_rate = 0.25
caption_extension = ".txt"
keep_tokens_separator = "|||"

[[datasets]]
caption_tag_dropout_rate = 1
secondary_separator = ";"
caption_separator = "/"
  [[datasets.subsets]]
  image_dir = '{a}'
  caption_dropout_every_n_epochs = 4
  [[datasets.subsets]]
  image_dir = '{b}'
  caption_dropout_rate = 0
  class_tokens = "bbb"
""", encoding="utf-8")
    (sa, sb), = [c.subsets for c in dataset_configs_from_args(make_args(dataset_config=str(path),
                                                                        dataset_repeats=3))]
    assert sa.caption_dropout_rate == 0.25 and sb.caption_dropout_rate == 0.0
    assert isinstance(sb.caption_tag_dropout_rate, float) and sb.caption_tag_dropout_rate == 1.0
    assert sa.caption_dropout_every_n_epochs == 4 and sb.caption_dropout_every_n_epochs == 0
    assert sa.keep_tokens_separator == "|||" and sa.secondary_separator == ";" and sa.caption_separator == "/"
    assert sa.num_repeats == sb.num_repeats == 3  # --dataset_repeats is kohya's num_repeats default
    entry = json.loads(build_dataset_group(dataset_configs_from_args(make_args(dataset_config=str(path))))
                       .metadata()["ss_datasets"])[0]
    assert entry["subsets"][0]["keep_tokens_separator"] == "|||" and entry["is_dreambooth"] is True


@pytest.mark.parametrize("body,needles", [
    ("caption_dropout_rate = 1.5", ["caption_dropout_rate", "between 0 and 1"]),
    ("caption_dropout_every_n_epochs = -1", ["caption_dropout_every_n_epochs", "negative"]),
    ("caption_separator = ''", ["caption_separator", "empty"]),
])
def test_toml_caption_key_ranges(tmp_path, body, needles):
    path = tmp_path / "d.toml"
    path.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n{body}\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        dataset_configs_from_args(make_args(dataset_config=str(path)))
    assert all(n in str(info.value) for n in needles)


# --- fine-tuning metadata (--in_json, metadata_file) ------------------------------------------------

def _metadata_dataset(tmp_path, with_resolution=False):
    imgs = tmp_path / "imgs"
    make_image(imgs / "img0.png", size=(64, 32))
    make_image(imgs / "img1.jpg", size=(32, 64), seed=1)
    make_image(imgs / "img2.png", size=(32, 32), seed=2)
    meta = {"img0": {"caption": "a cat", "tags": "red, blue"},
            str(imgs / "img1.jpg"): {"tags": "green, Red"},
            "img2": {}}
    if with_resolution:
        for key, reso in zip(meta, ([64, 32], [32, 64], [32, 32])):
            meta[key]["train_resolution"] = reso
    path = tmp_path / "meta_cap.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return imgs, path


def test_in_json_captions_tags_and_metadata(tmp_path):
    imgs, meta = _metadata_dataset(tmp_path)
    group = build(make_args(in_json=str(meta), train_data_dir=str(imgs), dataset_repeats=3, resolution="32"))
    captions = {r.path.rsplit("/", 1)[-1]: (r.caption, r.caption_source) for r in group.images}
    assert captions == {"img0.png": ("a cat,red, blue", "metadata"),     # caption + separator + tags
                        "img1.jpg": ("green, Red", "metadata"),          # tags alone
                        "img2.png": ("", "none")}
    assert group.num_train_images == 9 and group.num_batches_per_epoch == 9
    meta_out = group.metadata()
    assert json.loads(meta_out["ss_dataset_dirs"]) == {"meta_cap.json": {"n_repeats": 3, "img_count": 3}}
    # kohya counts "tags" only where there is also a caption (img1's tags became its caption).
    assert json.loads(meta_out["ss_tag_frequency"]) == {"meta_cap.json": {"red": 1, "blue": 1}}
    summary = group.summary()
    assert "ss_datasets" not in meta_out and "2 from the metadata file" in summary
    assert "meta_cap.json" in summary and "train_resolution" not in summary
    batch = group.epoch_dataset(0, 0)[0]
    assert batch["images"].shape == (1, 3, 32, 32)


def test_in_json_train_resolution_gives_the_buckets(tmp_path, capsys):
    imgs, meta = _metadata_dataset(tmp_path, with_resolution=True)
    group = build(make_args(in_json=str(meta), train_data_dir=str(imgs), resolution="32"))
    assert "train_resolution" in capsys.readouterr().out and group.datasets[0].enable_bucket
    for batch, ref in zip(group.epoch_dataset(0, 0), group.batches_for_epoch(0)):
        w, h = ref.bucket
        assert batch["images"].shape[2:] == (h, w)
    assert {r.placement.bucket for r in group.images} == {(64, 32), (32, 64), (32, 32)}
    assert "buckets from the metadata's train_resolution" in group.summary()
    with pytest.raises(UserError, match="bucket_no_upscale"):
        build(make_args(in_json=str(meta), train_data_dir=str(imgs), bucket_no_upscale=True))


def test_in_json_problems_are_listed(tmp_path):
    imgs, meta = _metadata_dataset(tmp_path)
    data = json.loads(meta.read_text())
    data["missing_one"] = {"caption": "x"}
    data["img2"] = {"caption": 5}
    meta.write_text(json.dumps(data))
    with pytest.raises(UserError) as info:
        build(make_args(in_json=str(meta), train_data_dir=str(imgs)))
    msg = str(info.value)
    assert "'missing_one'" in msg and "'caption' of 'img2'" in msg and "2 problem(s)" in msg
    meta.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        build(make_args(in_json=str(meta), train_data_dir=str(imgs)))
    with pytest.raises(UserError, match="does not exist"):
        build(make_args(in_json=str(tmp_path / "nope.json"), train_data_dir=str(imgs)))


def test_metadata_file_subset_in_dataset_config(tmp_path):
    imgs, meta = _metadata_dataset(tmp_path)
    db = make_folder(tmp_path, "db", n=1)
    path = tmp_path / "d.toml"
    path.write_text(f"""
[[datasets]]
resolution = 32
  [[datasets.subsets]]
  metadata_file = '{meta.name}'
  image_dir = '{imgs}'
  num_repeats = 2
[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = '{db}'
""", encoding="utf-8")
    group = build(make_args(dataset_config=str(path)))
    assert group.datasets[0].is_finetune and not group.datasets[1].is_finetune
    entries = json.loads(group.metadata()["ss_datasets"])
    assert entries[0]["is_dreambooth"] is False and entries[0]["subsets"][0]["metadata_file"] == "meta_cap.json"
    assert entries[1]["is_dreambooth"] is True and group.num_train_images == 6 + 1
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n"
                     f"[[datasets.subsets]]\nimage_dir = '{db}'\n", encoding="utf-8")
    with pytest.raises(UserError, match="mixes subsets"):
        dataset_configs_from_args(make_args(dataset_config=str(mixed)))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\nclass_tokens = 'x'\n",
                     encoding="utf-8")
    with pytest.raises(UserError, match="cannot set class_tokens"):
        dataset_configs_from_args(make_args(dataset_config=str(wrong)))


# --- DataLoader workers -------------------------------------------------------------------------------

def _same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["captions"] == b["captions"] and a["image_paths"] == b["image_paths"]
        assert torch.equal(a["images"], b["images"])


def test_persistent_workers_give_the_per_epoch_batches(tmp_path):
    make_folder(tmp_path / "t", "3_x", n=3, caption_ext=".caption",
                captions=["a, b, c", "d, e, f", "g, h, i"])
    group = build(make_args(train_data_dir=str(tmp_path / "t"), train_batch_size=2, shuffle_caption=True,
                            flip_aug=True, color_aug=True))
    feeder = BatchFeeder(group, seed=5, num_workers=1, persistent=True)
    first = feeder.epoch(0)
    _same_batches(list(first), list(group.epoch_dataset(0, 5)))
    workers = [w.pid for w in first._iterator._workers]
    second = feeder.epoch(1, start=2)  # a resume position inside the epoch
    assert second is first
    _same_batches(list(second), list(group.epoch_dataset(1, 5, start=2)))
    assert [w.pid for w in second._iterator._workers] == workers  # the same processes
    del first, second, feeder  # shuts the workers down

    plain = BatchFeeder(group, seed=5, num_workers=0, persistent=True)  # nothing to keep alive
    assert not plain.persistent
    _same_batches(list(plain.epoch(2, start=1)), list(group.epoch_dataset(2, 5, start=1)))
    assert plain.epoch(0) is not plain.epoch(1)  # a fresh loader per epoch
    with pytest.raises(ValueError):
        plain.epoch(0, start=99)

"""Tests for library.data: folders, captions, bad input, TOML, buckets, batches, caching, reports."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import build_dataset_group, dataset_configs_from_args
from library.data.buckets import BucketPlanner, bucket_resolutions
from library.data.latents import cache_path_for
from library.errors import UserError
from tests.data_helpers import make_args, make_folder, make_image, tiny_vae


def build(args, **kw):
    return build_dataset_group(dataset_configs_from_args(args), seed=args.seed, **kw)


def all_items(group, epoch, seed=0):
    return [i for ref in group.batches_for_epoch(epoch, seed) for i in ref.items]


# --- folders, repeats, class tokens, captions ----------------------------------------------------

def test_dreambooth_folders_repeats_and_class_tokens(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "10_test", n=2, caption_ext=".caption")
    make_folder(train, "5_sks dog", n=3, ext=".JPG", caption_ext=".caption")
    make_image(train / "5_sks dog" / "extra.webp")
    make_image(train / "5_sks dog" / "extra2.BMP", fmt="BMP")
    (train / "5_sks dog" / "notes.md").write_text("not an image")
    (train / ".ipynb_checkpoints").mkdir()
    group = build(make_args(train_data_dir=str(train)))
    subs = {os.path.basename(s.image_dir): s for s in group.datasets[0].subsets}
    assert set(subs) == {"10_test", "5_sks dog"}
    assert subs["10_test"].num_repeats == 10 and subs["10_test"].class_tokens == "test"
    assert subs["5_sks dog"].num_repeats == 5 and subs["5_sks dog"].class_tokens == "sks dog"
    assert len(group.images) == 7
    assert group.num_train_images == 2 * 10 + 5 * 5
    # The two extra images have no caption: they get the class token.
    captions = {os.path.basename(r.path): r.caption for r in group.images}
    assert captions["extra.webp"] == "sks dog" and captions["extra2.BMP"] == "sks dog"
    assert captions["img0.png"] == "caption 0, tag0" and captions["img2.JPG"] == "caption 2, tag2"


def test_caption_txt_fallback_one_notice(tmp_path, capsys):
    train = tmp_path / "train"
    make_folder(train, "3_cat", n=3, caption_ext=".txt", captions=["a cat", "b cat", "c cat"])
    group = build(make_args(train_data_dir=str(train)))
    out = capsys.readouterr().out
    assert out.count(".txt") >= 1 and out.count("note: no .caption caption files") == 1
    assert "3 image(s)" in out
    assert sorted(r.caption for r in group.images) == ["a cat", "b cat", "c cat"]
    # The explicit extension wins over the fallback.
    (train / "3_cat" / "img0.caption").write_text("from caption file", encoding="utf-8")
    group = build(make_args(train_data_dir=str(train)))
    assert "from caption file" in [r.caption for r in group.images]


def test_missing_caption_uses_class_token_and_warns_once(tmp_path, capsys):
    train = tmp_path / "train"
    make_folder(train, "2_sks person", n=3)
    (train / "2_sks person" / "img1.caption").write_text("  \n", encoding="utf-8")  # empty = none
    group = build(make_args(train_data_dir=str(train)))
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "3 image(s) have no caption" in out and "img0.png" in out
    assert {r.caption for r in group.images} == {"sks person"}


def test_caption_ops_prefix_suffix_shuffle_keep_tokens(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "1_x", n=1, caption_ext=".caption", captions=["first, a, b, c, d, e, f"])
    group = build(make_args(train_data_dir=str(train), shuffle_caption=True, keep_tokens=1,
                            caption_prefix="pre", caption_suffix="post", train_batch_size=1))
    seen = set()
    for epoch in range(8):
        caption = group.epoch_dataset(epoch, 0)[0]["captions"][0]
        # kohya joins prefix and suffix to the caption before shuffling: they belong to the first
        # and last tags, and the prefixed first tag is the one keep_tokens keeps.
        assert caption.startswith("pre first, ")
        tags = caption.split(", ")
        assert sorted(tags) == sorted(["pre first", "a", "b", "c", "d", "e", "f post"])
        seen.add(caption)
    assert len(seen) > 1  # really shuffled


def test_zero_repeat_folders_and_loose_images_are_noted(tmp_path, capsys):
    train = tmp_path / "train"
    make_folder(train, "0_off", n=1)
    make_folder(train, "2_on", n=1, caption_ext=".caption")
    make_image(train / "stray.png")
    group = build(make_args(train_data_dir=str(train), caption_extention="txt"))
    out = capsys.readouterr().out
    assert "0_off has 0 repeats and is skipped" in out and "1 image(s) directly inside" in out
    assert [os.path.basename(s.image_dir) for s in group.datasets[0].subsets] == ["2_on"]
    assert group.datasets[0].subsets[0].caption_extension == ".txt"  # kohya's misspelled flag


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="bucket range"):
        dataset_configs_from_args(make_args(train_data_dir=str(tmp_path), resolution="128",
                                            enable_bucket=True, min_bucket_reso=256))
    with pytest.raises(UserError, match="multiple of 8"):
        dataset_configs_from_args(make_args(train_data_dir=str(tmp_path), resolution="500,512"))
    with pytest.raises(UserError, match="--resolution"):
        dataset_configs_from_args(make_args(train_data_dir=str(tmp_path), resolution="big"))


# --- bad input ------------------------------------------------------------------------------------

def _bad_dataset(tmp_path):
    train = tmp_path / "train"
    folder = make_folder(train, "2_dog", n=2)
    good = make_image(tmp_path / "big.jpg", size=(64, 64))
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.jpeg").write_text("this is text, not an image")
    return train


def test_bad_images_listed_together(tmp_path):
    train = _bad_dataset(tmp_path)
    with pytest.raises(UserError) as info:
        build(make_args(train_data_dir=str(train)))
    msg = str(info.value)
    for name in ("truncated.jpg", "zero.png", "notes.jpeg"):
        assert name in msg
    assert "truncated" in msg and "0 bytes" in msg and "--skip_bad_images" in msg
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_skip_bad_images_trains_without_them(tmp_path, capsys):
    train = _bad_dataset(tmp_path)
    group = build(make_args(train_data_dir=str(train)), skip_bad_images=True)
    out = capsys.readouterr().out
    assert "truncated.jpg" in out and "zero.png" in out and "notes.jpeg" in out
    assert sorted(os.path.basename(r.path) for r in group.images) == ["img0.png", "img1.png"]


def test_all_images_skipped_is_an_error(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images"):
        build(make_args(train_data_dir=str(tmp_path / "train")), skip_bad_images=True)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist") as info:
        build(make_args(train_data_dir=str(tmp_path / "nope")))
    assert "nope" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty") as info:
        build(make_args(train_data_dir=str(tmp_path / "empty")))
    assert "10_dog" in str(info.value)
    (tmp_path / "t" / "3_cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images") as info:
        build(make_args(train_data_dir=str(tmp_path / "t")))
    assert "3_cat" in str(info.value)
    with pytest.raises(UserError, match="neither --train_data_dir"):
        dataset_configs_from_args(make_args())
    make_folder(tmp_path / "n" / "2_x", "photos", n=1)
    with pytest.raises(UserError, match="subfolder.*photos.*move them up"):
        build(make_args(train_data_dir=str(tmp_path / "n")))


def test_misnamed_subfolder_and_pointing_at_image_folder(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "dog", n=1)
    make_folder(train, "5_cat", n=1)
    with pytest.raises(UserError) as info:
        build(make_args(train_data_dir=str(train)))
    msg = str(info.value)
    assert "'dog'" in msg and "10_dog" in msg
    from library.data.scan import suggest_folder_name
    assert [suggest_folder_name(n) for n in ("5 cat", "cat_5", "sks dog")] == ["5_cat", "5_cat", "10_sks dog"]
    # Pointing --train_data_dir at the 10_dog folder itself.
    inner = make_folder(tmp_path / "data", "10_dog", n=2)
    with pytest.raises(UserError) as info:
        build(make_args(train_data_dir=str(inner)))
    assert "itself" in str(info.value) and str(tmp_path / "data") in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    train = _bad_dataset(tmp_path)
    make_folder(train, "cat", n=1)
    (train / "2_dog" / "img0.caption").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError) as info:
        build(make_args(train_data_dir=str(train)), skip_bad_images=False)
    msg = str(info.value)
    assert "img0.caption" in msg and "UTF-8" in msg and "'cat'" in msg and "zero.png" in msg
    assert "5 problem(s)" in msg


def test_non_utf8_caption_names_the_file_even_with_skip(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "1_x", n=1)
    (train / "1_x" / "img0.caption").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError) as info:
        build(make_args(train_data_dir=str(train)), skip_bad_images=True)
    assert "img0.caption" in str(info.value) and "re-save it as UTF-8" in str(info.value)


# --- TOML -----------------------------------------------------------------------------------------

def _write_toml(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_config_and_precedence(tmp_path):
    a = make_folder(tmp_path, "plain_a", n=2, size=(64, 64))
    b = make_folder(tmp_path, "plain_b", n=1, size=(64, 64))
    c = make_folder(tmp_path, "reg", n=1, size=(32, 32))
    path = _write_toml(tmp_path, f"""
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = "txt"
flip_aug = true

[[datasets]]
resolution = [64, 32]
batch_size = 3
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{a}'
  num_repeats = 4
  class_tokens = "aaa"
  keep_tokens = 3

  [[datasets.subsets]]
  image_dir = '{b}'

[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = '{c}'
  flip_aug = false
""")
    configs = dataset_configs_from_args(make_args(dataset_config=str(path), train_batch_size=2,
                                                  color_aug=True))
    d1, d2 = configs
    assert d1.resolution == (64, 32) and d1.batch_size == 3 and d2.resolution == (32, 32)
    assert d2.batch_size == 2                                  # from the flag
    sa, sb = d1.subsets
    assert sa.num_repeats == 4 and sa.class_tokens == "aaa" and sa.keep_tokens == 3   # subset wins
    assert sb.num_repeats == 1 and sb.keep_tokens == 1                                # dataset wins
    assert d2.subsets[0].keep_tokens == 2                                             # general wins
    assert sa.caption_extension == ".txt" and sa.shuffle_caption and sa.flip_aug
    assert not d2.subsets[0].flip_aug and d2.subsets[0].color_aug                     # flag used
    group = build_dataset_group(configs, seed=1)
    assert group.num_batches_per_epoch == -(-(2 * 4 + 1) // 3) + 1
    entries = json.loads(group.metadata()["ss_datasets"])
    assert [e["resolution"] for e in entries] == [[64, 32], [32, 32]]
    assert entries[0]["subsets"][0] == {**entries[0]["subsets"][0], "image_dir": "plain_a",
                                        "num_repeats": 4, "img_count": 2}
    for ref in group.batches_for_epoch(0):
        assert len({group.images[i].dataset for i in ref.items}) == 1


@pytest.mark.parametrize("text,needles", [
    ("[general]\nshufle_caption = true\n", ["shufle_caption", "[general]", "shuffle_caption"]),
    ("[[datasets]]\nbatch_sise = 2\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     ["batch_sise", "[[datasets]] #1", "batch_size"]),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nresolution = 512\n",
     ["resolution", "belongs in [[datasets]]"]),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = '3'\n",
     ["num_repeats", "whole number"]),
    ("[general]\ntoken_warmup_step = 10\n", ["token_warmup_step", "not support yet"]),
    ("[general]\ncaption_dropout_rate = 'x'\n", ["caption_dropout_rate", "a number"]),
    ("[genral]\n", ["genral", "top level", "general"]),
    ("[[datasets]]\nresolution = 512\n", ["no [[datasets.subsets]]"]),
    ("[general\n", ["not valid TOML"]),
])
def test_toml_errors_name_key_and_file(tmp_path, text, needles):
    path = _write_toml(tmp_path, text)
    with pytest.raises(UserError) as info:
        dataset_configs_from_args(make_args(dataset_config=str(path)))
    msg = str(info.value)
    assert "dataset.toml" in msg
    for needle in needles:
        assert needle in msg


def test_toml_image_dir_relative_to_config_file(tmp_path):
    make_folder(tmp_path / "cfg", "imgs", n=1)
    path = tmp_path / "cfg" / "d.toml"
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n", encoding="utf-8")
    group = build(make_args(dataset_config=str(path)))
    assert len(group.images) == 1


# --- buckets --------------------------------------------------------------------------------------

def test_bucket_resolutions_match_kohya_rules():
    resos = bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    assert (576, 448) in resos and (448, 576) in resos
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in resos)
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 for w, h in resos)


def test_bucket_assignment_and_no_upscale():
    planner = BucketPlanner((512, 512), True, 256, 1024, 64)
    wide = planner.place((1600, 900))
    assert wide.bucket[0] > wide.bucket[1]
    ratios = {b: abs(b[0] / b[1] - 1600 / 900) for b in planner.predefined}
    assert ratios[wide.bucket] == min(ratios.values())
    assert wide.resized[0] >= wide.bucket[0] and wide.resized[1] == wide.bucket[1]
    assert planner.place((512, 512)).bucket == (512, 512)
    noup = BucketPlanner((512, 512), True, 256, 1024, 64, no_upscale=True)
    small = noup.place((300, 200))
    assert small.bucket == (256, 192) and small.resized == (300, 200)   # own bucket, no upscaling
    big = noup.place((2000, 1000))
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.resized[0] < 2000
    assert big.bucket[0] % 64 == 0 and big.bucket[1] % 64 == 0
    off = BucketPlanner((512, 512))
    assert off.place((1000, 500)).bucket == (512, 512) and off.place((1000, 500)).resized == (1024, 512)


def test_bucketed_batches_have_bucket_shapes(tmp_path, capsys):
    train = tmp_path / "train"
    make_folder(train, "2_wide", n=3, size=(150, 48))
    make_folder(train, "2_tall", n=2, size=(40, 80), seed=10)
    make_folder(train, "1_square", n=1, size=(64, 64), seed=20)
    group = build(make_args(train_data_dir=str(train), resolution="64", enable_bucket=True,
                            min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                            train_batch_size=4))
    by_bucket = Counter(r.placement.bucket for r in group.images)
    assert by_bucket == {(96, 32): 3, (32, 96): 2, (64, 64): 1}
    ds = group.epoch_dataset(0, 0)
    for i in range(len(ds)):
        batch = ds[i]
        w, h = ds.refs[i].bucket
        assert batch["images"].shape[1:] == (3, h, w) and batch["latents"] is None
        assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    info = json.loads(group.metadata()["ss_bucket_info"])
    counts = {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()}
    assert counts == {(32, 96): 4, (64, 64): 1, (96, 32): 6}
    assert info["mean_img_ar_error"] > 0
    summary = group.summary()
    assert "96x32: 6" in summary


def test_no_bucket_covers_and_center_crops(tmp_path):
    train = tmp_path / "train"
    (train / "1_x").mkdir(parents=True)
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255  # white middle third
    Image.fromarray(arr).save(train / "1_x" / "a.png")
    group = build(make_args(train_data_dir=str(train), resolution="32"))
    img = group.epoch_dataset(0, 0)[0]["images"][0]
    assert img.shape == (3, 32, 32) and img.min() > 0.99  # the centre third, all white


def test_exif_orientation_swaps_size(tmp_path):
    train = tmp_path / "train"
    (train / "1_x").mkdir(parents=True)
    img = Image.fromarray(np.zeros((16, 48, 3), np.uint8))  # 48 wide, 16 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 16 wide, 48 tall
    img.save(train / "1_x" / "a.jpg", exif=exif)
    group = build(make_args(train_data_dir=str(train), resolution="16,48"))
    assert group.images[0].size == (16, 48)
    assert group.epoch_dataset(0, 0)[0]["images"].shape == (1, 3, 48, 16)


# --- batches, determinism, reg images -------------------------------------------------------------

def _mixed_group(tmp_path, **kw):
    train = tmp_path / "train"
    make_folder(train, "3_a", n=5, caption_ext=".caption")
    make_folder(train, "2_b", n=4, size=(32, 32), seed=50, caption_ext=".caption")
    return build(make_args(train_data_dir=str(train), train_batch_size=4, **kw))


def test_batches_deterministic_and_cover_each_image_times_repeats(tmp_path):
    group = _mixed_group(tmp_path)
    assert group.batches_for_epoch(3, 7) == group.batches_for_epoch(3, 7)
    assert group.batches_for_epoch(3, 7) != group.batches_for_epoch(4, 7)
    assert group.batches_for_epoch(3, 7) != group.batches_for_epoch(3, 8)
    expected = Counter({i: r.repeats for i, r in enumerate(group.images)})
    for epoch in range(3):
        assert Counter(all_items(group, epoch)) == expected
    assert group.num_batches_per_epoch == len(group.batches_for_epoch(0)) == -(-(15 + 8) // 4)
    assert all(len(ref.items) <= 4 for ref in group.batches_for_epoch(0))


def test_resume_from_batch_k_matches_uninterrupted(tmp_path):
    group = _mixed_group(tmp_path, flip_aug=True, shuffle_caption=True, color_aug=True, random_crop=True)
    full = group.epoch_dataset(2, 5)
    resumed = group.epoch_dataset(2, 5, start=3)
    assert len(resumed) == len(full) - 3
    for i in range(len(resumed)):
        a, b = full[3 + i], resumed[i]
        assert a["captions"] == b["captions"] and a["image_paths"] == b["image_paths"]
        assert torch.equal(a["images"], b["images"])
    clone = pickle.loads(pickle.dumps(resumed))  # DataLoader workers need a picklable dataset
    assert clone[0]["image_paths"] == resumed[0]["image_paths"]
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=0)
    assert sum(1 for _ in loader) == len(resumed)


def test_reg_images_balanced_and_weighted(tmp_path, capsys):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_folder(train, "10_sks dog", n=2, caption_ext=".caption")
    make_folder(reg, "1_dog", n=3, seed=30)
    group = build(make_args(train_data_dir=str(train), reg_data_dir=str(reg), prior_loss_weight=0.5,
                            train_batch_size=5))
    assert "warning" not in capsys.readouterr().out  # uncaptioned reg images are normal
    reg_recs = [r for r in group.images if r.is_reg]
    assert len(reg_recs) == 3 and group.num_reg_images == 3 and group.num_train_images == 20
    assert sum(r.repeats for r in reg_recs) == 20 and sorted(r.repeats for r in reg_recs) == [6, 7, 7]
    assert group.num_batches_per_epoch == 8
    weights = {}
    for batch in group.epoch_dataset(0, 0):
        for p, w in zip(batch["image_paths"], batch["loss_weights"].tolist()):
            weights[p] = w
    assert {weights[r.path] for r in reg_recs} == {0.5}
    assert {w for p, w in weights.items() if "train" in p} == {1.0}
    meta = group.metadata()
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    # Many reg images: only as many as needed are used.
    make_folder(reg, "1_dog", n=30, seed=30)
    group = build(make_args(train_data_dir=str(train), reg_data_dir=str(reg)))
    assert sum(r.repeats for r in group.images if r.is_reg) == 20 and group.num_reg_images == 30


# --- latent caching ------------------------------------------------------------------------------

class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts images encoded."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.encoded = vae, 0
        self.config = vae.config

    def encode(self, x):
        self.encoded += x.shape[0]
        return self.vae.encode(x)


def test_cache_latents_in_memory_with_flip(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "2_x", n=3, size=(64, 32))
    group = build(make_args(train_data_dir=str(train), resolution="64,32", train_batch_size=2, flip_aug=True))
    vae = CountingVAE(tiny_vae())
    group.cache_latents(vae, to_disk=False, vae_batch_size=4, progress=False)
    assert vae.encoded == 6  # each image and its mirror, once
    for batch in group.epoch_dataset(0, 0):
        assert batch["images"] is None
        assert batch["latents"].shape[1:] == (4, 4, 8) and batch["latents"].dtype == torch.float32
    plain, flipped = group.latents[0]
    assert not torch.allclose(plain, flipped)
    # Cached latents equal encoding the batch's image directly (mean, scaled).
    from library.data import encode_latents
    from library.data.transforms import load_image, to_tensor
    rec = group.images[1]
    direct = encode_latents(vae.vae, to_tensor(load_image(rec.path, rec.placement))[None])[0]
    assert torch.allclose(direct, group.latents[1][0], atol=1e-5)


def test_next_chunk_is_decoded_while_the_vae_encodes(tmp_path, monkeypatch):
    """Caching overlaps image decoding with the VAE: when chunk k is encoded, chunk k+1 is being read."""
    import threading

    import library.data.latents as latents

    train = tmp_path / "train"
    make_folder(train, "1_x", n=4, size=(32, 32))
    group = build(make_args(train_data_dir=str(train), resolution="32,32", train_batch_size=1))
    started: list = []
    next_started = threading.Event()
    load = latents._load_pixels

    def recording_load(job, grp):
        started.append(job[0])
        if len(started) > 2:  # a job of the second chunk (vae_batch_size 2)
            next_started.set()
        return load(job, grp)

    class WaitingVAE(CountingVAE):
        def encode(self, x):
            if self.encoded == 0:  # the first chunk: its successor is decoded meanwhile
                self.saw_prefetch = next_started.wait(timeout=10)
            return super().encode(x)

    monkeypatch.setattr(latents, "_load_pixels", recording_load)
    vae = WaitingVAE(tiny_vae())
    group.cache_latents(vae, to_disk=False, vae_batch_size=2, progress=False)
    assert vae.saw_prefetch and vae.encoded == 4 and sorted(started) == [0, 1, 2, 3]
    assert len(group.latents) == 4


def test_disk_cache_reused_and_invalidated(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "1_x", n=3)
    args = make_args(train_data_dir=str(train), resolution="32")
    vae = CountingVAE(tiny_vae(0))
    build(args).cache_latents(vae, to_disk=True, vae_batch_size=2, progress=False)
    assert vae.encoded == 3
    files = sorted(p.name for p in (train / "1_x").iterdir() if p.name.endswith(".safetensors"))
    assert files == ["img0.png.latents.safetensors", "img1.png.latents.safetensors",
                     "img2.png.latents.safetensors"]
    group = build(args)
    vae.encoded = 0
    group.cache_latents(vae, to_disk=True, progress=False)
    assert vae.encoded == 0 and len(group.latents) == 3  # all reused
    # A changed image is re-encoded, the others reused.
    make_image(train / "1_x" / "img1.png", size=(32, 32), seed=99)
    os.utime(train / "1_x" / "img1.png", ns=(1, 1))
    group = build(args)
    group.cache_latents(vae, to_disk=True, progress=False)
    assert vae.encoded == 1
    # A different VAE invalidates everything.
    other = CountingVAE(tiny_vae(1))
    group = build(args)
    group.cache_latents(other, to_disk=True, progress=False)
    assert other.encoded == 3
    # A different resolution (bucket) invalidates too.
    other.encoded = 0
    build(make_args(train_data_dir=str(train), resolution="16")).cache_latents(other, to_disk=True,
                                                                                progress=False)
    assert other.encoded == 3
    assert os.path.exists(cache_path_for(str(train / "1_x" / "img0.png")))
    # flip_aug needs the mirrored latents too: files without them are rebuilt, then reused.
    flip_args = make_args(train_data_dir=str(train), resolution="16", flip_aug=True)
    other.encoded = 0
    build(flip_args).cache_latents(other, to_disk=True, vae_batch_size=4, progress=False)
    assert other.encoded == 6
    other.encoded = 0
    group = build(flip_args)
    group.cache_latents(other, to_disk=True, progress=False)
    assert other.encoded == 0 and all(f is not None for _, f in group.latents.values())


def test_caching_refused_with_color_aug_or_random_crop(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "1_x", n=1)
    group = build(make_args(train_data_dir=str(train), color_aug=True))
    with pytest.raises(UserError, match="color_aug") as info:
        group.check_caching_allowed()
    assert "1_x" in str(info.value)
    with pytest.raises(UserError, match="cannot be combined"):
        group.cache_latents(tiny_vae(), progress=False)
    build(make_args(train_data_dir=str(train), flip_aug=True)).check_caching_allowed()


# --- reports --------------------------------------------------------------------------------------

def test_metadata_and_summary(tmp_path):
    train = tmp_path / "train"
    make_folder(train, "3_a", n=2, caption_ext=".caption", captions=["Red, blue", "red, green"])
    group = build(make_args(train_data_dir=str(train), train_batch_size=2))
    meta = group.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_num_batches_per_epoch"] == "3" and meta["ss_resolution"] == "(32, 32)"
    assert meta["ss_enable_bucket"] == "False" and json.loads(meta["ss_bucket_info"]) is None
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_a": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"]) == {"3_a": {"red": 2, "blue": 1, "green": 1}}
    for key in ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info"):
        json.loads(meta[key])
    summary = group.summary()
    assert "Steps (batches) per epoch: 3" in summary and "repeats: 3" in summary
    assert "2 from .caption" in summary and "class token: a" in summary

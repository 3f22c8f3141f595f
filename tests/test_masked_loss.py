"""Masked loss, dataset side: --alpha_mask and --conditioning_data_dir (kohya's names) deliver masks
with the image's own resize, crop and flip, cached with the latents, and the loss of a run counts
only the white half."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import build_dataset_group, dataset_configs_from_args
from library.errors import UserError
from tests.data_helpers import make_args, make_folder, tiny_vae
from tests.helpers import run_train_network, write_image_folder


def build(args):
    return build_dataset_group(dataset_configs_from_args(args), seed=args.seed)


def pattern(w, h, seed=0) -> np.ndarray:
    """A uint8 plane with structure at every scale, so a wrong crop or flip shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 255 // max(1, w - 1) + rng.integers(0, 40, (h, w)) + yy % 2) % 256).astype(np.uint8)


def save_rgba(path, alpha: np.ndarray):
    """An RGBA image whose red channel equals its alpha channel."""
    h, w = alpha.shape
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = alpha
    rgba[..., 1] = 100
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(path)


def batches(group, epochs=6):
    for epoch in range(epochs):
        yield from group.epoch_dataset(epoch)


# --- alpha masks -------------------------------------------------------------------------------------

def test_alpha_mask_follows_the_image_through_bucket_crop_and_flip(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    save_rgba(folder / "a.png", pattern(80, 48))          # resized and randomly cropped into its bucket
    Image.fromarray(np.full((48, 80, 3), 70, np.uint8)).save(folder / "b.png")  # no alpha: trained everywhere
    args = make_args(train_data_dir=str(tmp_path / "train"), resolution="64", enable_bucket=True, min_bucket_reso=32,
                     max_bucket_reso=128, bucket_reso_steps=8, random_crop=True, flip_aug=True, alpha_mask=True)
    group = build(args)
    seen = set()
    for batch in batches(group):
        masks, images = batch["alpha_masks"], batch["images"]
        assert masks.shape == (1, *images.shape[2:]) and masks.dtype == torch.float32
        if batch["image_paths"][0].endswith("a.png"):
            # red == alpha in the file, so after the same transforms they must still be equal
            torch.testing.assert_close(masks, (images[:, 0] + 1) / 2, atol=1e-6, rtol=0)
            seen.add(masks.numpy().tobytes())
        else:
            assert torch.equal(masks, torch.ones_like(masks))
    assert len(seen) > 1  # crops and flips really varied


def test_no_mask_keys_without_a_mask_source(tmp_path):
    make_folder(tmp_path / "train", "1_x", n=1)
    batch = next(iter(build(make_args(train_data_dir=str(tmp_path / "train"))).epoch_dataset(0)))
    assert batch["alpha_masks"] is None and batch["conditioning_images"] is None


# --- mask images (conditioning_data_dir) ---------------------------------------------------------------

def mask_dataset(tmp_path, names=("img0", "img1"), size=(48, 32)):
    train = tmp_path / "train"
    make_folder(train, "2_x", n=2, size=size)
    masks = tmp_path / "masks"
    masks.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        plane = pattern(*size, seed=i)
        Image.fromarray(np.stack([plane, plane // 2, plane // 3], -1)).save(masks / f"{name}.png")
    return train, masks


def test_mask_images_follow_the_image_and_flag_needs_masked_loss(tmp_path):
    train, masks = mask_dataset(tmp_path)
    common = dict(train_data_dir=str(train), resolution="32", flip_aug=True, random_crop=True,
                  conditioning_data_dir=str(masks))
    # Without --masked_loss the flag is another trainer's (ControlNet's): no masks.
    assert next(iter(build(make_args(**common)).epoch_dataset(0)))["conditioning_images"] is None
    group = build(make_args(masked_loss=True, **common))
    assert {r.conditioning.rsplit("/", 1)[-1] for r in group.images} == {"img0.png", "img1.png"}
    from library.data.transforms import load_sample
    for epoch in range(3):
        dataset = group.epoch_dataset(epoch)
        for pos, batch in enumerate(dataset):
            cond = batch["conditioning_images"]
            assert cond.shape == batch["images"].shape and batch["alpha_masks"] is None
            assert -1 <= cond.min() and cond.max() <= 1
            # the same crop and flip as the image: redo the batch's draws with a mask image in place
            # of the training image (same size, so the geometry is identical)
            rec = group.images[dataset.refs[pos].items[0]]
            rng = np.random.default_rng([0, epoch, 1, pos, 0])  # seed, epoch, stream, batch, place in it
            flip = bool(rng.random() < 0.5)
            expected, _, _ = load_sample(rec.conditioning, rec.placement, rng, random_crop=True, flip=flip)
            torch.testing.assert_close(cond[0], torch.from_numpy(expected.copy()).permute(2, 0, 1) / 127.5 - 1)


def test_missing_or_misshapen_mask_images_are_listed_before_training(tmp_path):
    train, masks = mask_dataset(tmp_path, names=("img1",))
    with pytest.raises(UserError) as err:
        build(make_args(train_data_dir=str(train), resolution="32", masked_loss=True, conditioning_data_dir=str(masks)))
    assert "img0.png" in str(err.value) and "no mask image" in str(err.value) and "img1" not in str(err.value)
    Image.new("RGB", (40, 40)).save(masks / "img0.png")  # square mask for a 48x32 image
    with pytest.raises(UserError, match="aspect ratio"):
        build(make_args(train_data_dir=str(train), resolution="32", masked_loss=True, conditioning_data_dir=str(masks)))
    with pytest.raises(UserError, match="does not exist"):
        build(make_args(train_data_dir=str(train), resolution="32", masked_loss=True,
                        conditioning_data_dir=str(tmp_path / "nowhere")))


def test_mask_sources_in_the_dataset_config(tmp_path):
    train, masks = mask_dataset(tmp_path)
    reg = make_folder(tmp_path / "reg", "1_x", n=1)
    config = tmp_path / "data.toml"
    config.write_text(f"""
[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = "{train / '2_x'}"
  conditioning_data_dir = "masks"
  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
""")
    group = build(make_args(dataset_config=str(config), masked_loss=True))
    subs = group.datasets[0].subsets
    assert subs[0].conditioning_data_dir == str(masks) and subs[1].conditioning_data_dir is None  # beside the file
    for batch in batches(group, 2):
        if "reg" in batch["image_paths"][0]:  # no mask folder: trained everywhere
            assert torch.equal(batch["conditioning_images"], torch.ones_like(batch["conditioning_images"]))
    with pytest.raises(UserError, match="only used with --masked_loss"):
        build(make_args(dataset_config=str(config)))
    config.write_text(config.read_text().replace('conditioning_data_dir = "masks"', "alpha_mask = true"))
    group = build(make_args(dataset_config=str(config), masked_loss=True))
    assert [s.alpha_mask for s in group.datasets[0].subsets] == [True, False]
    with pytest.raises(UserError, match="one kind"):  # both flags: every subset would have both masks
        build(make_args(train_data_dir=str(train), masked_loss=True, alpha_mask=True, conditioning_data_dir=str(masks)))
    with pytest.raises(UserError, match="needs masks"):
        build(make_args(train_data_dir=str(train), masked_loss=True))
    config.write_text("[general]\nconditioning_data_dir = \"masks\"\n[[datasets]]\n[[datasets.subsets]]\n"
                      f"image_dir = \"{train / '2_x'}\"\n")
    with pytest.raises(UserError, match="belongs in"):
        build(make_args(dataset_config=str(config), masked_loss=True))


# --- caching ---------------------------------------------------------------------------------------------

class CountingVAE(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae, self.encoded, self.config = vae, 0, vae.config

    def encode(self, x):
        self.encoded += x.shape[0]
        return self.vae.encode(x)


@pytest.mark.parametrize("source", ["alpha", "images"])
def test_masks_are_cached_with_the_latents_in_memory_and_on_disk(tmp_path, source):
    if source == "alpha":
        folder = tmp_path / "train" / "1_x"
        folder.mkdir(parents=True)
        for i in range(2):
            save_rgba(folder / f"img{i}.png", pattern(48, 32, seed=i))
        kw = dict(alpha_mask=True)
        key, name = "alpha_masks", "alpha_mask"
    else:
        train, masks = mask_dataset(tmp_path)
        kw = dict(masked_loss=True, conditioning_data_dir=str(masks))
        key, name = "conditioning_images", "conditioning"
    args = make_args(train_data_dir=str(tmp_path / "train"), resolution="32", flip_aug=True, **kw)
    uncached = {(e, i): b[key] for e in range(4) for i, b in enumerate(build(args).epoch_dataset(e))}
    vae = CountingVAE(tiny_vae())
    for to_disk in (False, True, True):  # memory; disk (written); disk again (read back, no encoding)
        vae.encoded = 0
        group = build(args)
        group.cache_latents(vae, to_disk=to_disk, vae_batch_size=4, progress=False)
        for e in range(4):
            for i, b in enumerate(group.epoch_dataset(e)):
                assert b["images"] is None
                torch.testing.assert_close(b[key], uncached[(e, i)], atol=0, rtol=0)
    assert vae.encoded == 0  # the third pass read latents and masks from the files
    from safetensors import safe_open
    from library.data.latents import cache_path_for
    path = cache_path_for(group.images[0].path)
    with safe_open(path, "pt") as f:
        assert {name, name + "_flipped", "latents", "latents_flipped"} <= set(f.keys())
        assert f.get_tensor(name).dtype == torch.uint8
    if source == "images":  # a changed mask image rebuilds its image's cache file
        import os
        mask = group.images[0].conditioning
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(mask)
        os.utime(mask, ns=(1, 1))
        build(args).cache_latents(vae, to_disk=True, vae_batch_size=4, progress=False)
        assert vae.encoded == 2  # that image and its mirror


# --- end to end: the loss counts only the white half ------------------------------------------------------

def tb_scalar(logs, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.parametrize("cached", [False, True])
def test_a_half_mask_trains_on_that_half_only(tiny_model, tmp_path, cached):
    """Left-half and right-half masks split the unmasked run's loss and its first SGD step exactly
    (loss and gradient are linear in the mask, and the halves add up to the whole image)."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    folder = write_image_folder(data, "1_sks disk", count=1, size=64)
    plain = np.asarray(Image.open(folder / "img_000.png"))
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    halves = {"left": left, "right": 255 - left}
    if not cached:  # mask images, uncached
        for side, m in halves.items():
            (tmp_path / side).mkdir()
            Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / side / "img_000.png")

    def run(name, *extra, data_dir=data):
        out = tmp_path / name
        run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data_dir}",
                           f"--output_dir={out}", f"--logging_dir={out / 'logs'}", "--resolution=64",
                           "--network_dim=4", "--max_train_steps=1", "--seed=3", "--caption_extension=.txt",
                           "--optimizer_type=SGD", "--learning_rate=50", "--max_grad_norm=0",
                           "--max_data_loader_n_workers=0", *(["--cache_latents"] if cached else []), *extra])
        return tb_scalar(out / "logs", "loss/current")[0], load_file(str(out / "last.safetensors"))

    full_loss, full = run("full")
    results = {}
    for side, m in halves.items():
        if cached:  # the same pixels with the mask as alpha
            rgba_dir = tmp_path / f"alpha_{side}" / "1_sks disk"
            rgba_dir.mkdir(parents=True)
            Image.fromarray(np.dstack([plain, m]), "RGBA").save(rgba_dir / "img_000.png")
            (rgba_dir / "img_000.txt").write_text("a sks disk")
            results[side] = run(side, "--masked_loss", "--alpha_mask", data_dir=rgba_dir.parent)
        else:
            results[side] = run(side, "--masked_loss", f"--conditioning_data_dir={tmp_path / side}")
    (left_loss, left_w), (right_loss, right_w) = results["left"], results["right"]
    assert 0 < left_loss < full_loss and 0 < right_loss < full_loss
    assert left_loss + right_loss == pytest.approx(full_loss, rel=1e-4)
    moved = 0
    for key in full:
        if key.endswith("lora_up.weight"):  # starts at zero: after one step it is -lr x its gradient
            torch.testing.assert_close(left_w[key] + right_w[key], full[key], rtol=1e-3, atol=1e-7, msg=key)
            moved += bool(left_w[key].abs().sum() > 0)
        else:
            torch.testing.assert_close(left_w[key], full[key], msg=key)
    assert moved > 0

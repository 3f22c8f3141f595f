"""Inpainting ControlNet from COCO (fast part): the COCO reader (polygons, RLE, filters, errors before
training), the condition (hole at -1, dilation, random masks, captions), its determinism per
(seed, epoch), compositing, and train_controlnet.py + infer.py end to end on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from tests import inpaint_support as I


def _args(*flags):
    import train_controlnet
    from library.controlnet.config import parse_args

    return parse_args(train_controlnet.setup_parser(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                                        "--resolution", "64", *flags])


def _coco_args(coco, *flags):
    return _args("--image_dir", str(coco["image_dir"]), "--ann_file", str(coco["ann_file"]), "--min_mask_area", "20",
                 *flags)


@pytest.fixture
def coco(tmp_path):
    """6 images with 1-2 disks each; instances in all three segmentation formats."""
    return I.write_mini_coco(tmp_path / "coco", 6, seed=1, instances_per_image=(1, 2))


def _edit(coco, change):
    data = json.loads(coco["ann_file"].read_text())
    change(data)
    coco["ann_file"].write_text(json.dumps(data))


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_reader_decodes_polygons_and_rle_and_leaves_out_crowds_and_small_instances(coco):
    from library.controlnet.coco import decode_mask, read_coco

    first = coco["items"][0]["instances"][0]

    def add(data):  # image 1: a crowd region (uncompressed RLE) and a tiny instance; image 2: only a tiny one
        big = I.segmentation("rle_list", 32, 32, 20, (64, 64))
        data["annotations"] += [
            {"id": 100, "image_id": 1, "category_id": 1, "segmentation": big, "area": 1200, "iscrowd": 1},
            {"id": 101, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 4, 1, 4, 4]], "area": 5, "iscrowd": 0}]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
        data["annotations"].append({"id": 102, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 4]],
                                    "iscrowd": 0})  # no "area": computed from the polygon
    _edit(coco, add)
    warnings = []
    entries = read_coco(coco["image_dir"], coco["ann_file"], min_mask_area=20, warn=warnings.append)
    by_file = {e["image"]: e for e in entries}
    assert str(coco["items"][1]["file"]) not in by_file and len(entries) == 5
    assert any("1 image(s)" in w and "no usable instance" in w for w in warnings)
    spec = by_file[coco["items"][0]["file"]]["inpaint"]
    assert [i.ann_id for i in spec.instances] == [inst["id"] for inst in coco["items"][0]["instances"]]
    kinds = set()
    for item in coco["items"]:
        if item["file"] not in by_file:
            continue
        for inst, got in zip(item["instances"], by_file[item["file"]]["inpaint"].instances):
            seg = got.segmentation
            kinds.add("polygon" if isinstance(seg, list) else f"rle ({type(seg['counts']).__name__} counts)")
            truth = I.disk_mask(inst["cx"], inst["cy"], inst["r"] + 0.5)
            assert (decode_mask(got.segmentation, 64, 64) ^ truth).sum() <= 4, inst  # polygons: edge pixels
            assert got.category == inst["category"]
    assert len(kinds) == 3  # polygons, compressed RLE (a string) and uncompressed RLE (a list)
    two = next(e for e in entries if len(e["inpaint"].instances) == 2)
    assert two["caption"] == "a " + ", a ".join(dict.fromkeys(i.category for i in two["inpaint"].instances))
    assert spec.size == (64, 64) and first["category"] in spec.caption


@pytest.mark.parametrize("case", ["no_ann_file", "no_image_dir", "image_missing", "all_too_small", "unknown_image",
                                  "bad_polygon", "rle_wrong_size", "not_json", "size_differs", "wrong_type",
                                  "image_dir_only", "two_sources"])
def test_bad_input_stops_before_any_model_is_loaded(coco, case, tmp_path):
    import train_controlnet

    flags = {"image_dir": str(coco["image_dir"]), "ann_file": str(coco["ann_file"]), "min_mask_area": "20"}
    expect = {"no_ann_file": "--ann_file does not exist", "no_image_dir": "--image_dir folder does not exist",
              "image_missing": "000003.png", "all_too_small": "no usable instance",
              "unknown_image": "image_id 999", "bad_polygon": "fewer than 3 points",
              "rle_wrong_size": "an RLE of size [32, 32]", "not_json": "not valid JSON",
              "size_differs": "differ in size", "wrong_type": "not a 'radar_heatmap' condition",
              "image_dir_only": "without --ann_file", "two_sources": "two data sources"}[case]
    extra = []
    if case == "no_ann_file":
        flags["ann_file"] = str(tmp_path / "missing.json")
    elif case == "no_image_dir":
        flags["image_dir"] = str(tmp_path / "nowhere")
    elif case == "image_missing":
        (coco["image_dir"] / "000003.png").unlink()
    elif case == "all_too_small":
        flags["min_mask_area"] = "500"
    elif case == "unknown_image":
        _edit(coco, lambda d: d["annotations"][0].update(image_id=999))
    elif case == "bad_polygon":
        _edit(coco, lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]))
    elif case == "rle_wrong_size":
        _edit(coco, lambda d: d["annotations"][0].update(segmentation={"size": [32, 32], "counts": "abc"}))
    elif case == "not_json":
        coco["ann_file"].write_text("{images: ")
    elif case == "size_differs":
        Image.new("RGB", (80, 64)).save(coco["image_dir"] / "000002.png")
    elif case == "wrong_type":
        extra = ["--conditioning_type", "radar_heatmap"]
    elif case == "image_dir_only":
        del flags["ann_file"]
    elif case == "two_sources":
        extra = ["--train_data_dir", str(coco["image_dir"])]
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no_model_here"), "--output_dir", str(tmp_path / "out"),
            "--resolution", "64", *[v for k, x in flags.items() for v in (f"--{k}", x)], *extra]
    with pytest.raises(UserError) as err:
        train_controlnet.main(argv)
    message = str(err.value)
    assert expect in message and "Fix:" in message, message
    if case in ("image_missing", "size_differs"):  # --skip_bad_images leaves those images out instead
        from library.controlnet.data import build_datasets

        train, _, _ = build_datasets(_coco_args(coco, "--skip_bad_images"), seed=0, warn=lambda m: None)
        assert len(train.images) == 5


def _instance_holes(coco, path, dilation):
    """{category: [hole of each instance of that category]} of one image, as the condition should cut them."""
    from library.controlnet.inpaint import dilate

    item = next(i for i in coco["items"] if i["file"] == path)
    holes = {}
    for inst in item["instances"]:
        holes.setdefault("a " + inst["category"], []).append(
            dilate(I.disk_mask(inst["cx"], inst["cy"], inst["r"] + 0.5), dilation))
    return holes


def test_condition_is_the_image_with_the_dilated_instance_at_minus_one(coco):
    from library.controlnet.data import build_datasets

    train, _, ctype = build_datasets(_coco_args(coco, "--mask_dilation", "3", "--random_mask_prob", "0",
                                                "--train_batch_size", "2"), seed=0)
    assert ctype.name == "inpaint" and ctype.describe()["mask_dilation"] == 3  # auto picks inpaint with --ann_file
    seen = 0
    for batch in train.epoch_dataset(0, 0):
        for cond, caption, path in zip(batch["controlnet_cond"], batch["captions"], batch["image_paths"]):
            cond = cond.permute(1, 2, 0).numpy()
            hole = (cond == -1).all(axis=-1)
            assert ((cond == -1).any(axis=-1) == hole).all()  # all three channels or none
            image = _load(path) / 255.0
            assert np.allclose(cond[~hole], image[~hole], atol=1e-6)
            candidates = _instance_holes(coco, path, 3)[caption]  # the caption names the masked instance
            assert min(int((hole ^ c).sum()) for c in candidates) <= 4
            seen += 1
        weight = ctype.weight_source(batch["controlnet_cond"])
        assert torch.equal(weight[:, 0] > 0, (batch["controlnet_cond"] == -1).all(dim=1))
    assert seen == 6
    rec = train.images[0]  # render (the types' common interface) is one fixed draw
    fixed = ctype.render(train.specs[rec.path], rec.size, rec.placement)
    assert np.array_equal(fixed, ctype.sample(train.specs[rec.path], rec.placement, np.random.default_rng(0))[0])


def test_the_masked_instance_is_drawn_per_seed_and_epoch_and_survives_a_resume(coco):
    from library.controlnet.data import build_datasets

    def conditions(seed, epoch, start=0, flags=()):
        train, _, _ = build_datasets(_coco_args(coco, "--train_batch_size", "2", *flags), seed=seed)
        return [(b["controlnet_cond"], b["captions"]) for b in train.epoch_dataset(epoch, seed, start)]

    a, again = conditions(0, 1), conditions(0, 1)
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, again))
    resumed = conditions(0, 1, start=2)  # a resume that skips the epoch's first two batches
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a[2:], resumed))
    epochs = [torch.cat([c for c, _ in conditions(0, e)]) for e in range(4)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    assert not torch.equal(torch.cat([c for c, _ in conditions(1, 1)]), epochs[1])


def test_random_box_and_stroke_masks_and_caption_modes(coco, tmp_path):
    from library.controlnet.data import build_datasets

    train, _, _ = build_datasets(_coco_args(coco, "--random_mask_prob", "1", "--mask_dilation", "0",
                                            "--train_batch_size", "3"), seed=0)
    captions = {}
    for batch in train.epoch_dataset(0, 0):
        for cond, caption, path in zip(batch["controlnet_cond"], batch["captions"], batch["image_paths"]):
            hole = (cond == -1).all(dim=0).numpy()
            assert 0 < hole.mean() < 0.6
            instances = [h for hs in _instance_holes(coco, path, 0).values() for h in hs]
            assert all((hole ^ h).sum() > 10 for h in instances)
            item = next(i for i in coco["items"] if i["file"] == path)
            assert caption == ", ".join(dict.fromkeys("a " + i["category"] for i in item["instances"]))
            captions[path] = caption
    train, _, _ = build_datasets(_coco_args(coco, "--caption_prefix", "a photo of", "--random_mask_prob", "0"), seed=0)
    for batch in train.epoch_dataset(0, 0):  # the caption options apply to the instance's caption
        assert all(c.startswith("a photo of a ") and c.endswith(" circle") for c in batch["captions"])
    for mode, expect in (("image", lambda p: captions[p]), ("none", lambda p: "")):
        train, _, _ = build_datasets(_coco_args(coco, "--inpaint_caption", mode, "--random_mask_prob", "0"), seed=0)
        for batch in train.epoch_dataset(0, 0):
            assert batch["captions"] == [expect(p) for p in batch["image_paths"]]
    # a folder of images without annotations: random holes only, the folder's captions
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_load(coco["items"][i]["file"])).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    train, _, ctype = build_datasets(_args("--train_data_dir", str(folder), "--conditioning_type", "inpaint",
                                           "--caption_extension", ".txt"), seed=0)
    for batch in train.epoch_dataset(0, 0):
        assert batch["captions"] == [f"caption {Path(batch['image_paths'][0]).stem}"]
        assert (batch["controlnet_cond"] == -1).all(dim=1).any()


def test_an_instance_the_crop_cuts_away_is_not_masked(tmp_path):
    from library.controlnet.data import build_datasets

    # a 96 x 64 image trained at 64 x 64 (centre crop): x < 16 is cut away, and so is the instance there
    (tmp_path / "images").mkdir()
    Image.new("RGB", (96, 64), (90, 90, 90)).save(tmp_path / "images" / "wide.png")
    seg = [[2, 20, 12, 20, 12, 40, 2, 40]]
    data = {"images": [{"id": 1, "file_name": "wide.png", "width": 96, "height": 64}],
            "categories": [{"id": 1, "name": "post"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg, "area": 200, "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    train, _, _ = build_datasets(_args("--image_dir", str(tmp_path / "images"), "--ann_file",
                                       str(tmp_path / "ann.json"), "--random_mask_prob", "0", "--mask_dilation", "0",
                                       "--min_mask_area", "100"), seed=0)
    for epoch in range(3):
        batch = next(iter(train.epoch_dataset(epoch, 0)))
        hole = (batch["controlnet_cond"][0] == -1).all(dim=0)
        assert hole.any() and batch["captions"] == ["a post"]  # a random hole; the image's caption
        assert not hole[20:40, :1].all()  # not the instance's remains at the crop's left edge


def test_the_user_guides_flag_names(tmp_path):
    import train_controlnet

    assert train_controlnet.normalise_argv(["--batch_size", "4", "--num_epochs=100", "--image_dir", "x"]) == \
        ["--train_batch_size", "4", "--max_train_epochs=100", "--image_dir", "x"]


def test_random_masks_cover_part_of_the_image():
    from library.controlnet.inpaint import random_box, random_strokes

    rng = np.random.default_rng(0)
    for _ in range(50):
        for mask in (random_box(rng, 64, 48), random_strokes(rng, 64, 48)):
            assert mask.shape == (48, 64) and 0 < mask.mean() < 0.7


def test_composite_keeps_every_pixel_outside_the_mask():
    from library.controlnet.inpaint import composite, generation_size, prepare, psnr

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 72, 3), dtype=np.uint8)
    mask = np.zeros((56, 72), bool)
    mask[20:30, 30:44] = True
    assert generation_size(72, 56, (64, 64), 8) == (72, 56) and generation_size(640, 480, (512, 512), 64) == (576, 448)
    cond, hole, paste = prepare(image, mask, (64, 64), 2)
    assert cond.shape == (64, 64, 3) and (cond[hole] == -1).all() and (cond[~hole] >= 0).all()
    assert (paste & mask).sum() == mask.sum() and paste.sum() > mask.sum()  # the dilated hole, at the input's size
    generated = np.ones((64, 64, 3), np.float32)
    out = composite(image, generated, paste)
    assert out.shape == image.shape and (out[~paste] == image[~paste]).all() and (out[paste] == 255).all()
    assert psnr(out / 255, image / 255, ~paste) == float("inf")


def test_mask_files(tmp_path):
    from library.controlnet.inpaint import load_mask

    mask = np.zeros((32, 40), np.uint8)
    mask[4:10, 5:9] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    warned = []
    got = load_mask(tmp_path / "m.png", (80, 64), warned.append)
    assert got.shape == (64, 80) and got[8:20, 10:18].all() and got.sum() < 200 and "stretched" in warned[0]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(UserError, match="no white pixel"):
        load_mask(tmp_path / "empty.png", (8, 8))


# --- end to end on the tiny model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from tests.test_controlnet_train import train

    root = tmp_path_factory.mktemp("inpaint")
    coco = I.write_mini_coco(root / "coco", 8, seed=2, instances_per_image=(1, 2))
    out = root / "out"
    train(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--image_dir", str(coco["image_dir"]),
           "--ann_file", str(coco["ann_file"]), "--output_dir", str(out), "--resolution", "64", "--train_batch_size",
           "4", "--cache_latents", "--max_train_steps", "3", "--learning_rate", "1e-3", "--seed", "1",
           "--min_mask_area", "20", "--mask_dilation", "3", "--loss_weight_factor", "10", "--validation_split", "0.25",
           "--log_images_every_n_steps", "3"])
    return {"out": out, "coco": coco, "tiny": tiny_model}


def test_training_records_the_inpaint_settings(trained):
    from library.controlnet.model import read_record

    record = read_record(trained["out"] / "controlnet")
    assert record["conditioning_type"] == "inpaint" and record["mask_dilation"] == 3
    assert read_record(trained["out"] / "last.safetensors") == record
    done = json.loads((trained["out"] / "training_complete.json").read_text())
    assert done["steps"] == 3 and np.isfinite(done["history"][-1]["val/loss"])


def test_log_images_rows_are_image_mask_masked_condition_and_result_composited_outside_the_mask(trained):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    pngs = sorted((trained["out"] / "sample").glob("*.png"))
    assert [p.name for p in pngs] == ["last_images_000003.png"]
    grid = _load(pngs[0])
    assert grid.shape == (2 * 64, 4 * 64, 3)  # the 2 validation images x 4 columns
    for row in range(2):
        image, mask, cond, result = (grid[row * 64:(row + 1) * 64, c * 64:(c + 1) * 64] for c in range(4))
        hole = mask[..., 0] == 255
        assert set(np.unique(mask)) == {0, 255} and 0 < hole.sum() < hole.size
        assert np.array_equal(result[~hole], image[~hole])  # the input outside the mask, pixel for pixel
        assert np.array_equal(cond[~hole], image[~hole]) and (cond[hole] == 0).all()  # the hole (-1) as black
    acc = EventAccumulator(str(next((trained["out"] / "logs").rglob("events.out.tfevents.*")).parent),
                           size_guidance={IMAGES: 0})
    acc.Reload()
    events = acc.Images("controlnet/images")
    assert [e.step for e in events] == [3] and (events[0].width, events[0].height) == (4 * 64, 2 * 64)


def test_infer_pastes_the_result_into_the_input_only_inside_the_mask(trained, tmp_path, capsys):
    import infer

    src = _load(trained["coco"]["items"][0]["file"])
    image = np.ascontiguousarray(np.concatenate([src, src[:, :8]], axis=1)[:56])  # 72 x 56: not the trained size
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros((56, 72), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "res" / "result.png"
    assert infer.main(["--checkpoint_path", str(trained["out"]), "--input_image", str(tmp_path / "in.png"),
                       "--input_mask", str(tmp_path / "mask.png"), "--prompt", "a red circle", "--steps", "2",
                       "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "generated at 64 x 64" in said and "grown by 3 px" in said  # the training dilation by default
    result, paste = _load(out), np.asarray(Image.open(out.with_name("result_mask.png"))) > 127
    assert result.shape == image.shape and Image.open(out.with_name("result_raw.png")).size == (64, 64)
    assert paste[10:30, 20:40].all() and paste.sum() > 400  # the mask, grown
    assert (result[~paste] == image[~paste]).all()
    assert (result[paste] != image[paste]).any()
    # the ControlNet as a plain torch state dict (a Lightning-style controlnet.pth) gives the same image
    from library.controlnet.model import load_controlnet

    state = load_controlnet(trained["out"] / "controlnet").state_dict()
    torch.save({"state_dict": {f"controlnet.{k}": v for k, v in state.items()}}, tmp_path / "controlnet.pth")
    out2 = tmp_path / "pth.png"
    infer.main(["--checkpoint_path", str(tmp_path / "controlnet.pth"), "--input_image", str(tmp_path / "in.png"),
                "--input_mask", str(tmp_path / "mask.png"), "--prompt", "a red circle", "--steps", "2",
                "--output", str(out2), "--mask_dilation", "3", "--width", "64", "--height", "64",
                "--pretrained_model_name_or_path", str(trained["tiny"].diffusers_dir)])  # a .pth records nothing
    assert (_load(out2) == result).all()


def test_infer_errors_name_the_file(trained, tmp_path):
    import infer

    with pytest.raises(UserError, match="--input_mask does not exist"):
        infer.main(["--checkpoint_path", str(trained["out"]), "--input_image", trained["coco"]["items"][0]["file"],
                    "--input_mask", str(tmp_path / "none.png")])
    torch.save({"state_dict": {}}, tmp_path / "empty.pth")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(UserError, match="no base model"):
        infer.main(["--checkpoint_path", str(tmp_path / "empty.pth"), "--input_image",
                    trained["coco"]["items"][0]["file"], "--input_mask", str(tmp_path / "m.png")])

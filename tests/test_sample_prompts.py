"""Sample prompts in kohya's .txt/.toml/.json formats, every sampler name, and samples during training
(files under <output_dir>/sample/ and images in TensorBoard)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from library.errors import UserError
from library.prompts import SAMPLERS, SamplePrompt, read_prompt_file
from tests.helpers import run_train_network, write_image_folder

EXPECTED = [SamplePrompt("a cat", negative="dog", width=64, height=96, steps=3, scale=4.5, seed=7, sampler="euler_a"),
            SamplePrompt("a tree", width=128, height=128, steps=30, scale=7.5)]


def test_txt_prompts_with_kohya_inline_options(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\na cat --n dog --w 64 --h 96 --s 3 --l 4.5 --d 7 --ss Euler_A\n\na tree\n")
    assert read_prompt_file(path, (128, 128)) == EXPECTED
    path.write_text("a cat --ss nosuch\n")
    with pytest.raises(UserError, match="unknown sampler 'nosuch'") as err:
        read_prompt_file(path)
    assert "euler_a" in str(err.value) and str(path) in str(err.value)


def test_toml_prompt_tables_and_kohya_subset_form(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[prompt]]\nprompt = "a cat"\nnegative_prompt = "dog"\nwidth = 64\nheight = 96\n'
                    'sample_steps = 3\nscale = 4.5\nseed = 7\nsample_sampler = "euler_a"\n\n'
                    '[[prompt]]\nprompt = "a tree"\n')
    assert read_prompt_file(path, (128, 128)) == EXPECTED
    # kohya's form: shared values in [prompt], one prompt per [[prompt.subset]] (its keys win)
    path.write_text('[prompt]\nwidth = 128\nheight = 128\nsample_steps = 30\n\n'
                    '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "dog"\nwidth = 64\nheight = 96\n'
                    'sample_steps = 3\nscale = 4.5\nseed = 7\nsample_sampler = "euler_a"\n\n'
                    '[[prompt.subset]]\nprompt = "a tree"\n')
    assert read_prompt_file(path, (256, 256)) == EXPECTED
    path.write_text('[[prompt]]\nprompt = "a cat"\nsampel_steps = 3\n')
    with pytest.raises(UserError, match="did you mean 'sample_steps'"):
        read_prompt_file(path)
    path.write_text('[[prompt]]\nprompt = "a cat"\nwidth = "wide"\n')
    with pytest.raises(UserError, match="'width' in prompt #1"):
        read_prompt_file(path)


def test_json_prompt_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([
        {"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 96, "sample_steps": 3, "scale": 4.5,
         "seed": 7, "sample_sampler": "euler_a", "enum": 0},  # kohya writes "enum"; ignored
        "a tree"]))  # a string is read like a .txt line
    assert read_prompt_file(path, (128, 128)) == EXPECTED
    path.write_text("[{\"prompt\": ")
    with pytest.raises(UserError, match="not valid JSON"):
        read_prompt_file(path)


@pytest.fixture(scope="module")
def tiny_sd(tiny_model):
    from library.models.loading import load_sd_model

    return load_sd_model(str(tiny_model.single_file))


def test_every_sampler_name_makes_an_image(tiny_sd, tmp_path):
    """One prompt per sampler name (kohya's k_ names too), each with its own --ss, in one call."""
    from PIL import Image

    from library.training.sampling import generate_samples

    usable = [name for name in SAMPLERS if "lms" not in name or importlib.util.find_spec("scipy")]
    prompts = [SamplePrompt("a disk", width=64, height=64, steps=2, scale=3.0, seed=1, sampler=s) for s in usable]
    m = tiny_sd
    files = generate_samples(unet=m.unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                             base_scheduler=m.noise_scheduler, prompts=prompts, sampler="ddim", out_dir=tmp_path,
                             name_prefix="s", device="cpu")
    assert len(files) == len(usable) >= 15
    pixels = {}
    for name, path in zip(usable, files):
        with Image.open(path) as img:
            assert img.size == (64, 64)
            pixels[name] = img.tobytes()
    # the sampler really changed: ddim, euler and dpm_2 (two model calls a step) differ
    assert len({pixels["ddim"], pixels["euler"], pixels["dpm_2"]}) == 3
    assert pixels["euler"] == pixels["k_euler"]
    if not importlib.util.find_spec("scipy"):
        for name in ("lms", "k_lms"):
            with pytest.raises(UserError, match="needs scipy"):
                generate_samples(unet=m.unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                 base_scheduler=m.noise_scheduler, prompts=prompts[:1], sampler=name,
                                 out_dir=tmp_path, name_prefix="x", device="cpu")


def test_samples_during_training_reach_tensorboard(tiny_model, tmp_path):
    """kohya's schedule: --sample_at_first, and with --sample_every_n_epochs the step setting is
    ignored; per-prompt sampler from the .toml; images in <output_dir>/sample and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=1)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\n\n[[prompt.subset]]\nprompt = "a sks disk"\n'
                       'seed = 5\n\n[[prompt.subset]]\nprompt = "a disk"\nsample_sampler = "euler_a"\nseed = 6\n')
    out, logs = tmp_path / "out", tmp_path / "logs"
    run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data}",
                       f"--output_dir={out}", f"--logging_dir={logs}", "--log_with=tensorboard", "--resolution=64",
                       "--max_train_epochs=3", "--seed=1", "--caption_extension=.txt", "--max_data_loader_n_workers=0",
                       f"--sample_prompts={prompts}", "--sample_at_first", "--sample_every_n_steps=1",
                       "--sample_every_n_epochs=2"])
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert [n.split("_")[1] for n in names] == ["000000", "000000", "e000002", "e000002"], names
    assert {n.rsplit("_", 1)[1] for n in names} == {"5.png", "6.png"}  # the prompts' seeds
    acc = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent), size_guidance={IMAGES: 0})
    acc.Reload()
    assert sorted(acc.Tags()[IMAGES]) == ["sample/00", "sample/01", "sample/grid"]
    events = acc.Images("sample/01")
    assert [e.step for e in events] == [0, 2] and (events[0].width, events[0].height) == (64, 64)
    grids = acc.Images("sample/grid")  # both prompts side by side
    assert [e.step for e in grids] == [0, 2] and (grids[0].width, grids[0].height) == (128, 64)

"""gen_img.py: LoRA multipliers, equality with diffusers' pipeline + load_lora_weights, PNG infotext, seeds.

Tiny SD1.5-structured model at 64x64 with 2-3 steps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library import generation
from library.errors import UserError
from library.prompts import SamplePrompt
from networks.lora_format import data_section_sha256
from tests.test_lora_tools import make_lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_loras")
    return (make_lora(root / "style.safetensors", 5, dim=4, alpha=4.0, conv=True),
            make_lora(root / "char.safetensors", 6, dim=8, alpha=2.0))


def run(tiny_model, out_dir, *extra):
    gen_img.main(["--ckpt", str(tiny_model.diffusers_dir), "--outdir", str(out_dir), "--W", "64", "--H", "64",
                  *extra])
    return {p.name: p for p in sorted(out_dir.glob("*.png"))}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_network_mul_zero_equals_no_lora(tiny_model, loras, tmp_path):
    common = ["--prompt", "a cat", "--steps", "2", "--seed", "3", "--images_per_prompt", "2", "--batch_size", "2"]
    plain = run(tiny_model, tmp_path / "plain", *common)
    zero = run(tiny_model, tmp_path / "zero", *common, "--network_module", "networks.lora",
               "--network_weights", str(loras[0]), "--network_mul", "0")
    assert len(plain) == len(zero) == 2
    for a, b in zip(plain.values(), zero.values()):
        assert np.array_equal(pixels(a), pixels(b))
        assert a.name.endswith(("_000_3.png", "_001_4.png"))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_equals_diffusers_pipeline_with_load_lora_weights(tiny_model, loras, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    ours = run(tiny_model, tmp_path / "ours", "--prompt", "a cat --n blurry", "--steps", "3", "--seed", "7",
               "--sampler", "euler_a", "--images_per_prompt", "2", "--batch_size", "2",
               "--network_weights", str(loras[0]), str(loras[1]), "--network_mul", "0.8", "0.5")

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model.diffusers_dir), local_files_only=True,
                                                   safety_checker=None)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def theirs(seed):
        image = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5, height=64,
                     width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        return (image * 255).round().astype(np.int16)

    without = [theirs(7), theirs(8)]
    pipe.load_lora_weights(str(loras[0]), adapter_name="style")
    pipe.load_lora_weights(str(loras[1]), adapter_name="char")
    pipe.set_adapters(["style", "char"], adapter_weights=[0.8, 0.5])
    for path, seed, base in zip(ours.values(), (7, 8), without):
        want = theirs(seed)
        assert np.abs(want - base).max() > 10  # the LoRAs visibly change the image
        assert np.abs(pixels(path) - want).max() <= 1  # float rounding may flip a level


def test_prompt_file_options_and_webui_infotext(tiny_model, loras, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red ball --n ugly --s 1 --l 5 --d 11\n\nsecond --w 72 --s 1\n",
                       encoding="utf-8")
    images = run(tiny_model, tmp_path / "out", "--from_file", str(prompts), "--seed", "100", "--sampler", "euler",
                 "--clip_skip", "2", "--network_weights", str(loras[1]), "--network_mul", "0.7")
    assert len(images) == 2
    first, second = (Image.open(p) for p in images.values())
    assert first.text["parameters"] == (
        "a red ball <lora:char:0.7>\nNegative prompt: ugly\nSteps: 1, Sampler: Euler, CFG scale: 5, Seed: 11, "
        "Size: 64x64, Model: tiny-sd15, Clip skip: 2, Lora hashes: \"char: "
        + data_section_sha256(loras[1])[:12] + "\"")
    assert second.size == (72, 64)
    assert "Seed: 101, Size: 72x64" in second.text["parameters"]  # the run's seed counts up per image
    assert "Negative prompt" not in second.text["parameters"]


def test_seeds_and_batches():
    a, b = SamplePrompt("a", seed=50), SamplePrompt("b", width=64)
    jobs, base = generation.plan_jobs([a, b], 2, 9)
    assert [(j.prompt.prompt, j.seed, j.index) for j in jobs] == [("a", 50, 0), ("a", 51, 1), ("b", 11, 2), ("b", 12, 3)]
    # a size change starts a new batch; batch_size caps the rest
    assert [[j.index for j in batch] for batch in generation.batches(jobs, 3)] == [[0, 1], [2, 3]]
    assert [[j.index for j in batch] for batch in generation.batches(jobs, 1)] == [[0], [1], [2], [3]]


@pytest.mark.skipif(__import__("importlib").util.find_spec("scipy") is not None, reason="scipy is installed")
def test_sampler_needing_scipy_says_so():
    from diffusers import DDPMScheduler

    from library.prompts import make_scheduler

    with pytest.raises(UserError, match="'lms' needs scipy"):
        make_scheduler("lms", DDPMScheduler())


def test_bad_input_is_a_user_error(tiny_model, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(UserError, match="--network_mul has 2 values for 1 files"):
        run(tiny_model, tmp_path, "--prompt", "x", "--network_weights", str(loras[0]), "--network_mul", "1", "0.5")
    with pytest.raises(UserError, match="exactly one of --prompt and --from_file"):
        run(tiny_model, tmp_path)
    with pytest.raises(UserError, match="--from_file file does not exist"):
        run(tiny_model, tmp_path, "--from_file", str(tmp_path / "none.txt"))
    with pytest.raises(SystemExit):
        run(tiny_model, tmp_path, "--prompt", "x", "--sampler", "nonsense")
    with pytest.raises(UserError, match="LoRA file not found"):
        run(tiny_model, tmp_path, "--prompt", "x", "--network_weights", str(tmp_path / "missing.safetensors"))
    sd = load_file(loras[1])
    name = "lora_unet_down_blocks_7_attentions_0_proj_in"
    sd.update({f"{name}.lora_down.weight": torch.zeros(8, 4, 1, 1), f"{name}.lora_up.weight": torch.zeros(4, 8, 1, 1),
               f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="1 modules name layers the model does not have .lora_unet_down_blocks_7"):
        run(tiny_model, tmp_path, "--prompt", "x", "--steps", "1", "--network_weights", str(tmp_path / "extra.safetensors"))
    assert not list(tmp_path.glob("*.png"))

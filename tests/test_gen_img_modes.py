"""gen_img.py's img2img, inpainting, highres fix, textual inversion and per-prompt network
multipliers, checked against diffusers' own pipelines on the tiny SD1.5-structured model.

kohya's rules (gen_img.py): --strength defaults to 0.8 and a prompt's --t overrides it; --am sets
each network's multiplier for one prompt (its last value repeats); the highres fix's first pass runs
at int(W * scale + 0.5) rounded down to a multiple of 32 with --highres_fix_steps, is upscaled with
Lanczos (or bicubic on the latents) and refined by img2img at W x H; files of the two passes are
told apart by the prefixes 0 and 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.errors import UserError
from tests.test_gen_img import loras, pixels  # noqa: F401


def run(tiny_model, out_dir, *extra):
    gen_img.main(["--ckpt", str(tiny_model.diffusers_dir), "--outdir", str(out_dir), "--sampler", "euler",
                  "--steps", "4", "--seed", "5", *extra])
    return sorted(out_dir.glob("*.png"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    start.save(root / "start.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root / "start.png", root / "mask.png"


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model.diffusers_dir), local_files_only=True,
                                                   safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_pixels(array) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255).round().astype(np.int16)


def test_img2img_equals_diffusers(tiny_model, pictures, diffusers_pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    start, _ = pictures
    ours = run(tiny_model, tmp_path / "a", "--prompt", "a cat", "--image_path", str(start), "--strength", "0.5")
    theirs = StableDiffusionImg2ImgPipeline.from_pipe(diffusers_pipe)(
        "a cat", image=Image.open(start).convert("RGB"), strength=0.5, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert Image.open(ours[0]).size == (64, 64)  # the start image's size without --W/--H
    assert np.abs(pixels(ours[0]) - as_pixels(theirs)).max() <= 1
    assert "Denoising strength: 0.5" in Image.open(ours[0]).text["parameters"]
    # a prompt's --t wins over --strength
    per_prompt = run(tiny_model, tmp_path / "b", "--prompt", "a cat --t 0.5", "--image_path", str(start),
                     "--strength", "0.9")
    assert np.array_equal(pixels(per_prompt[0]), pixels(ours[0]))


def test_inpainting_equals_diffusers_and_keeps_the_unmasked_part(tiny_model, pictures, diffusers_pipe, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    start, mask = pictures
    ours = run(tiny_model, tmp_path / "a", "--prompt", "a cat", "--image_path", str(start), "--mask_path", str(mask),
               "--strength", "1")
    theirs = StableDiffusionInpaintPipeline.from_pipe(diffusers_pipe)(
        "a cat", image=Image.open(start).convert("RGB"), mask_image=Image.open(mask).convert("L"), strength=1.0,
        num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(5), width=64, height=64,
        output_type="np").images[0]
    assert np.abs(pixels(ours[0]) - as_pixels(theirs)).max() <= 1
    img2img = run(tiny_model, tmp_path / "b", "--prompt", "a cat", "--image_path", str(start), "--strength", "1")
    inside = (slice(20, 44), slice(20, 44))
    # outside the mask the inpainting stays nearer the start image than a plain img2img at strength 1
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False
    start_px = pixels(start)
    assert np.abs(pixels(ours[0]) - start_px)[outside].mean() < np.abs(pixels(img2img[0]) - start_px)[outside].mean()
    assert np.abs(pixels(ours[0]) - start_px)[inside].mean() > 5  # and the masked part is repainted


def test_highres_fix_two_passes_as_kohya(tiny_model, diffusers_pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    files = run(tiny_model, tmp_path / "hr", "--prompt", "a cat", "--W", "128", "--H", "96",
                "--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--strength", "0.6",
                "--highres_fix_save_1st")
    first = [p for p in files if "_0000_" in p.name]
    final = [p for p in files if "_1000_" in p.name]
    assert len(first) == len(final) == 1
    assert Image.open(first[0]).size == (64, 32)   # int(128*.5+.5)=64, int(96*.5+.5)=48 -> 32 (multiple of 32)
    assert Image.open(final[0]).size == (128, 96)
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Lanczos" in Image.open(final[0]).text["parameters"]

    small = diffusers_pipe("a cat", width=64, height=32, num_inference_steps=3, guidance_scale=7.5,
                           generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert np.abs(pixels(first[0]) - as_pixels(small)).max() <= 1
    up = Image.fromarray(as_pixels(small).astype(np.uint8)).resize((128, 96), Image.LANCZOS)
    big = StableDiffusionImg2ImgPipeline.from_pipe(diffusers_pipe)(
        "a cat", image=up, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert np.abs(pixels(final[0]) - as_pixels(big)).max() <= 1

    latent = run(tiny_model, tmp_path / "lat", "--prompt", "a cat", "--W", "128", "--H", "96",
                 "--highres_fix_scale", "0.5", "--highres_fix_steps", "2", "--highres_fix_latents_upscaling")
    assert [Image.open(p).size for p in latent] == [(128, 96)]


def test_textual_inversion_files(tiny_model, tmp_path):
    """An embedding holding the input vectors of real words generates what those words generate,
    in A1111's .pt, kohya's .safetensors and diffusers' format; multi-vector embeddings too."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model.diffusers_dir / "tokenizer")
    table = CLIPTextModel.from_pretrained(tiny_model.diffusers_dir / "text_encoder").get_input_embeddings().weight

    def vectors(words):
        ids = tok(words).input_ids[1:-1]
        return table[ids].detach().clone()

    torch.save({"string_to_param": {"*": vectors("cat")}, "name": "x", "step": 10}, tmp_path / "mycat.pt")
    save_file({"emb_params": vectors("red ball")}, str(tmp_path / "myball.safetensors"))
    torch.save({"<other>": vectors("dog")[0]}, tmp_path / "mydog.bin")
    embs = [str(tmp_path / f) for f in ("mycat.pt", "myball.safetensors", "mydog.bin")]
    words = run(tiny_model, tmp_path / "words", "--W", "64", "--H", "64", "--prompt", "a cat with a red ball --n dog")
    tokens = run(tiny_model, tmp_path / "tokens", "--W", "64", "--H", "64", "--prompt",
                 "a mycat with a myball --n mydog", "--textual_inversion_embeddings", *embs)
    other = run(tiny_model, tmp_path / "other", "--W", "64", "--H", "64", "--prompt", "a mycat with a myball")
    assert np.abs(pixels(tokens[0]) - pixels(words[0])).max() <= 1
    assert np.abs(pixels(other[0]) - pixels(words[0])).max() > 5  # without the files the names are other words


def test_per_prompt_network_multipliers(tiny_model, loras, tmp_path):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --am 0 --d 3\na cat --d 3\n", encoding="utf-8")
    images = run(tiny_model, tmp_path / "am", "--W", "64", "--H", "64", "--from_file", str(prompts),
                 "--network_weights", str(loras[0]), str(loras[1]), "--network_mul", "0.8", "0.5")
    plain = run(tiny_model, tmp_path / "plain", "--W", "64", "--H", "64", "--prompt", "a cat --d 3")
    off, on = images
    assert np.array_equal(pixels(off), pixels(plain[0]))                 # --am 0 (repeated) turns both off
    assert np.abs(pixels(on) - pixels(plain[0])).max() > 5
    assert "<lora:style:0> <lora:char:0>" in Image.open(off).text["parameters"]
    assert "<lora:style:0.8> <lora:char:0.5>" in Image.open(on).text["parameters"]


def test_mode_bad_input(tiny_model, pictures, tmp_path):
    from safetensors.torch import save_file

    start, mask = pictures
    with pytest.raises(UserError, match="without --image_path"):
        run(tiny_model, tmp_path, "--prompt", "x", "--mask_path", str(mask))
    with pytest.raises(UserError, match="image not found|does not exist"):
        run(tiny_model, tmp_path, "--prompt", "x", "--image_path", str(tmp_path / "none.png"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot be read as an image"):
        run(tiny_model, tmp_path, "--prompt", "x", "--image_path", str(tmp_path / "broken.jpg"))
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserError, match="SDXL embedding"):
        run(tiny_model, tmp_path, "--prompt", "x", "--textual_inversion_embeddings", str(tmp_path / "xl.safetensors"))
    save_file({"emb_params": torch.zeros(2, 7)}, str(tmp_path / "wrongdim.safetensors"))
    with pytest.raises(UserError, match="cannot be used with this model"):
        run(tiny_model, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
            str(tmp_path / "wrongdim.safetensors"))
    with pytest.raises(SystemExit):
        run(tiny_model, tmp_path, "--prompt", "x", "--image_path", str(start), "--strength", "1.5")
    assert not list(tmp_path.glob("*.png"))

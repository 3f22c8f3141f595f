"""gen_img.py as kohya's: img2img (--image_path --strength), inpainting (--mask_path), hires fix
(--highres_fix_scale --highres_fix_steps), textual-inversion embeddings (A1111 and kohya files) and
--from_file per-line --t / --am. Each is compared with diffusers' own pipeline on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_gen_img import pixels, run
from tests.test_lora_tools import make_lora


@pytest.fixture(scope="module")
def pipes(tiny_model):
    from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)

    base = StableDiffusionPipeline.from_pretrained(str(tiny_model.diffusers_dir), local_files_only=True,
                                                   safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    out = {"txt2img": base, "img2img": StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False),
           "inpaint": StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def as_pixels(image) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_inputs")
    rng = np.random.default_rng(3)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (30, 90, 160)
    img[16:48, 16:48] = (220, 200, 40)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / "start.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root / "start.png", root / "mask.png"


def test_img2img_equals_diffusers_img2img(tiny_model, pipes, start_image, tmp_path):
    """kohya gen_img --image_path --strength (its img2img: init_timestep = int(steps * strength))."""
    ours = run(tiny_model, tmp_path / "o", "--prompt", "a cube", "--steps", "4", "--seed", "5",
               "--image_path", str(start_image[0]), "--strength", "0.6")
    (path,) = ours.values()
    want = pipes["img2img"]("a cube", image=Image.open(start_image[0]).convert("RGB"), strength=0.6,
                            num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                            output_type="np").images[0]
    assert np.abs(pixels(path) - as_pixels(want)).max() <= 1
    plain = run(tiny_model, tmp_path / "p", "--prompt", "a cube", "--steps", "4", "--seed", "5")
    assert np.abs(pixels(next(iter(plain.values()))) - pixels(path)).max() > 10  # the start image mattered


def test_inpainting_equals_diffusers_inpaint(tiny_model, pipes, start_image, tmp_path):
    """kohya gen_img --mask_path (white = redrawn), with diffusers' inpaint pipeline on a plain SD model."""
    ours = run(tiny_model, tmp_path / "o", "--prompt", "a cube", "--steps", "4", "--seed", "5",
               "--image_path", str(start_image[0]), "--mask_path", str(start_image[1]), "--strength", "1.0")
    (path,) = ours.values()
    want = pipes["inpaint"]("a cube", image=Image.open(start_image[0]).convert("RGB"),
                            mask_image=Image.open(start_image[1]).convert("L"), strength=1.0, width=64, height=64,
                            num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                            output_type="np").images[0]
    assert np.abs(pixels(path) - as_pixels(want)).max() <= 1
    got, start = pixels(path), np.asarray(Image.open(start_image[0])).astype(np.int16)
    # the kept half stays near the start image (through the VAE); the masked half is redrawn
    assert np.abs(got[:, :32] - start[:, :32]).mean() < np.abs(got[:, 32:] - start[:, 32:]).mean()


def test_hires_fix_is_small_draw_enlarge_and_img2img(tiny_model, pipes, tmp_path):
    """kohya gen_img --highres_fix_scale/--highres_fix_steps: the first pass at int(size * scale + 0.5)
    down to a multiple of 32, in highres_fix_steps steps; then img2img at full size (strength 0.8)."""
    ours = run(tiny_model, tmp_path / "o", "--prompt", "a cube", "--steps", "4", "--seed", "5",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "3")
    (path,) = ours.values()
    small = pipes["txt2img"]("a cube", width=32, height=32, num_inference_steps=3, guidance_scale=7.5,
                             generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    enlarged = Image.fromarray((small * 255).round().clip(0, 255).astype("uint8")).resize((64, 64), Image.LANCZOS)
    want = pipes["img2img"]("a cube", image=enlarged, strength=0.8, num_inference_steps=4, guidance_scale=7.5,
                            generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert Image.open(path).size == (64, 64)
    assert np.abs(pixels(path) - as_pixels(want)).max() <= 1


def test_textual_inversion_embeddings_a1111_and_kohya_files(tiny_model, tmp_path):
    """An embedding holding the token vectors of "red cube" makes "a <name>" draw as "a red cube" does,
    from an A1111 .pt (string_to_param) and a kohya .safetensors (emb_params)."""
    from safetensors.torch import save_file

    from library.models.loading import load_sd_model

    model = load_sd_model(str(tiny_model.diffusers_dir))
    ids = model.tokenizer("red cube").input_ids[1:-1]
    vectors = model.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    torch.save({"string_to_param": {"*": vectors}, "name": "redcube"}, tmp_path / "redcube.pt")
    save_file({"emb_params": vectors.contiguous()}, str(tmp_path / "kcube.safetensors"))
    common = ["--steps", "3", "--seed", "4"]
    want = pixels(next(iter(run(tiny_model, tmp_path / "w", "--prompt", "a red cube", *common).values())))
    for name, file in (("redcube", "redcube.pt"), ("kcube", "kcube.safetensors")):
        got = run(tiny_model, tmp_path / name, "--prompt", f"a {name}", *common,
                  "--textual_inversion_embeddings", str(tmp_path / file))
        assert np.abs(pixels(next(iter(got.values()))) - want).max() <= 1, name
    other = pixels(next(iter(run(tiny_model, tmp_path / "x", "--prompt", "a blue ball", *common).values())))
    assert np.abs(other - want).max() > 10


def test_from_file_per_line_strength_and_network_multipliers(tiny_model, start_image, tmp_path):
    """kohya gen_img's per-line options: --t (img2img strength) and --am (network multipliers)."""
    lora = make_lora(tmp_path / "l.safetensors", 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube --d 1 --am 0\na cube --d 1\na cube --d 1 --T 0.3\n", encoding="utf-8")
    got = list(run(tiny_model, tmp_path / "o", "--from_file", str(prompts), "--steps", "4",
                   "--network_weights", str(lora), "--image_path", str(start_image[0])).values())
    plain = run(tiny_model, tmp_path / "plain", "--prompt", "a cube --d 1", "--steps", "4",
                "--image_path", str(start_image[0]))
    assert np.abs(pixels(got[0]) - pixels(next(iter(plain.values())))).max() <= 1  # --am 0: no LoRA
    assert np.abs(pixels(got[1]) - pixels(got[0])).max() > 10  # the LoRA at the run's multiplier
    assert np.abs(pixels(got[2]) - pixels(got[1])).max() > 10  # a lower strength keeps more of the start
    assert "<lora:l:0>" in Image.open(got[0]).text["parameters"]

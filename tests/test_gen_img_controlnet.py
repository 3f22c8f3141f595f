"""gen_img.py with a ControlNet: --controlnet / --control_image / --control_scale (kohya's
--control_net_models / --guide_image_path / --control_net_weights spellings too).

The ControlNet is made from the tiny model's UNet like train_controlnet.py makes one, with its zero
convolutions set to random values (a fresh ControlNet adds exactly zero, which would prove nothing).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.errors import UserError


@pytest.fixture(scope="module")
def controlnet_files(tiny_model, tmp_path_factory):
    from library.controlnet.model import create_controlnet, save_controlnet, save_controlnet_single_file
    from library.models.loading import load_sd_model

    root = tmp_path_factory.mktemp("gen_controlnet")
    model = load_sd_model(tiny_model.diffusers_dir)
    controlnet = create_controlnet(model.unet, model.vae)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    folder = save_controlnet(controlnet, root / "controlnet", {"conditioning_type": "image"})
    single = save_controlnet_single_file(controlnet, root / "controlnet.safetensors", {"conditioning_type": "image"})
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = root / f"cond{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(path)  # not the output size
        images.append(path)
    return {"folder": folder, "single": single, "images": images}


def run(tiny_model, out_dir, *extra):
    gen_img.main(["--ckpt", str(tiny_model.diffusers_dir), "--outdir", str(out_dir), "--W", "64", "--H", "64",
                  "--prompt", "a cat", "--steps", "3", "--seed", "5", *extra])
    return [np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in sorted(out_dir.glob("*.png"))], \
        sorted(out_dir.glob("*.png"))


def test_scale_zero_is_the_plain_model_and_scale_one_follows_the_condition(tiny_model, controlnet_files, tmp_path):
    cn = ["--controlnet", str(controlnet_files["folder"]), "--control_image", str(controlnet_files["images"][0])]
    plain, _ = run(tiny_model, tmp_path / "plain")
    off, _ = run(tiny_model, tmp_path / "off", *cn, "--control_scale", "0")
    on, files = run(tiny_model, tmp_path / "on", *cn, "--control_scale", "1")
    assert np.abs(off[0] - plain[0]).max() <= 1
    assert np.abs(on[0] - plain[0]).mean() > 5
    text = Image.open(files[0]).text["parameters"]
    assert 'ControlNet 0: "Model: controlnet, Weight: 1, Image: cond0.png"' in text


def test_equals_diffusers_controlnet_pipeline_and_the_single_file(tiny_model, controlnet_files, tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    images = [str(p) for p in controlnet_files["images"]]
    ours, _ = run(tiny_model, tmp_path / "ours", "--control_net_models", str(controlnet_files["folder"]),
                  "--guide_image_path", *images, "--control_net_weights", "0.7", "--images_per_prompt", "2",
                  "--batch_size", "2")
    single, _ = run(tiny_model, tmp_path / "single", "--controlnet", str(controlnet_files["single"]),
                    "--control_image", *images, "--control_scale", "0.7", "--images_per_prompt", "2")

    controlnet = ControlNetModel.from_pretrained(str(controlnet_files["folder"]), local_files_only=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(tiny_model.diffusers_dir), controlnet=controlnet,
                                                             local_files_only=True, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i, seed in enumerate((5, 6)):  # image i uses conditioning image i and seed 5 + i
        cond = Image.open(images[i]).convert("RGB").resize((64, 64), Image.BICUBIC)
        want = pipe("a cat", image=cond, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                    controlnet_conditioning_scale=0.7, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images[0]
        want = (want * 255).round().astype(np.int16)
        assert np.abs(ours[i] - want).max() <= 1
        assert np.abs(single[i] - ours[i]).max() <= 1
    assert np.abs(ours[0] - ours[1]).mean() > 1


def test_controlnet_flag_problems_are_user_errors(tiny_model, controlnet_files, tmp_path):
    with pytest.raises(UserError, match="needs a conditioning image"):
        run(tiny_model, tmp_path / "a", "--controlnet", str(controlnet_files["folder"]))
    with pytest.raises(UserError, match="without --controlnet"):
        run(tiny_model, tmp_path / "b", "--control_image", str(controlnet_files["images"][0]))
    with pytest.raises(UserError, match="conditioning image"):
        run(tiny_model, tmp_path / "c", "--controlnet", str(controlnet_files["folder"]),
            "--control_image", str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="ControlNet"):
        run(tiny_model, tmp_path / "d", "--controlnet", str(tmp_path / "nothing"),
            "--control_image", str(controlnet_files["images"][0]))

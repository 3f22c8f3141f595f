"""The learning proofs of train_controlnet.py on the radar toy world (tests/controlnet_support.py).

Stage 1: a ControlNet trained by the script on radar listings (targets -> heatmaps drawn by us)
puts the disk where the heatmap peaks, measured on samples from diffusers' stock ControlNet
pipeline against the same pipeline at controlnet scale 0 and chance, and the held-out denoising
loss with the true condition beats the one with shuffled conditions. Stage 2: a UNet LoRA trained
on the frozen ControlNet teaches "a sks circle" = white (the base world has no white) while the
disks stay where the heatmaps say; --lora_scale and --controlnet_scale move their measures in order.

Recipes and numbers measured while writing these tests (64 samples, 20 DDIM steps, hit = object
centre within 6 px of the heatmap peak, chance 4.4 %): stage 1, 1000 steps at lr 1e-3, batch 16,
loss weight factor 30: hit 96.9 % (mean error 1.6 px) vs 3.1 % at controlnet scale 0; held-out
loss true / shuffled condition 0.043 / 0.139 (factor 0: 98.4 %, 0.015 / 0.038; at 250 steps
factor 30 reached 48 % and factor 0 33 %). Stage 2, 600 steps at lr 2e-3, rank 8, factor 30:
whiteness 0.196 / 0.359 / 0.456 at LoRA scale 0 / 0.5 / 1 (VAE ceiling 0.750), hit 98 / 92 / 100 %;
controlnet scale 0 / 0.5 / 1 with the LoRA: hit 2 / 61 / 100 %. (400 steps at lr 1e-3 without the
weighting: whiteness 0.382 and hit 83 %.)

With the one-head UNet (2026-11-23; the numbers above were measured with 8 heads): stage 1 hit 90.6 %
vs 3.1 % at scale 0, held-out loss 0.040 / 0.110; stage 2 whiteness 0.155 / 0.279 / 0.453, hit
98 / 100 / 100 %, controlnet scale 0 / 0.5 / 1: hit 6 / 80 / 100 %. Base 204 s, stage 1 255 s, stage 2 159 s.

Measured numbers are printed and written to test-artifacts/controlnet_learning.json.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests import controlnet_support as S
from tests.helpers import artifact_recorder
from tests.test_controlnet_train import train

pytestmark = pytest.mark.slow(cpu_minutes=12)  # incl. building its base once

SIGMA, TOL = 4.0, 6.0           # heatmap sigma and hit distance, pixels of the 64 px images
STAGE1 = ["--max_train_steps", "1000", "--train_batch_size", "16", "--learning_rate", "1e-3",
          "--loss_weight_factor", "30"]
STAGE2 = ["--max_train_steps", "600", "--train_batch_size", "16", "--learning_rate", "2e-3", "--lora_rank", "8",
          "--loss_weight_factor", "30"]
N_EVAL = 64
record = artifact_recorder("controlnet_learning.json")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar_toy")
    t0 = time.perf_counter()
    base = S.radar_toy_base()
    record("base_fixture_s", round(time.perf_counter() - t0, 1))
    data = S.write_radar_dataset(root / "data", 1024 + 64, seed=11, val=64)
    white = S.write_radar_dataset(root / "white", 256 + 32, seed=12, colours=(S.NEW_COLOUR,), word="sks", val=32)
    return {"base": base, "data": data, "white": white, "root": root}


def flags(toy, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(toy["base"]), "--train_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "64", "--cache_latents", "--seed", "0",
            "--heatmap_sigma", str(SIGMA), *extra]


@pytest.fixture(scope="module")
def stage1(toy):
    out = toy["root"] / "stage1"
    t0 = time.perf_counter()
    train(flags(toy, toy["data"], out, *STAGE1))
    record("stage1_train_s", round(time.perf_counter() - t0, 1))
    return out


@pytest.fixture(scope="module")
def sampler(toy):
    """generate(controlnet_dir, prompt, controlnet_scale, lora_dir=None, lora_scale=1) -> (images, points)."""
    from library.controlnet import inference as inf
    from library.controlnet.conditioning import RadarConditioning
    from library.controlnet.model import load_controlnet
    from library.controlnet.radar import RadarAxes, Target
    from library.models.loading import load_sd_model

    points = S.random_points(N_EVAL, seed=99)
    radar = RadarConditioning(RadarAxes(S.RANGE_MAX, S.VEL_MAX), SIGMA)
    conds = [radar.from_targets([Target(**S.target_of(x, y))], S.SIZE, S.SIZE) for x, y in points]

    def generate(controlnet_dir, prompts, controlnet_scale=1.0, lora_dir=None, lora_scale=1.0):
        model = load_sd_model(toy["base"])
        pipe = inf.build_pipeline(model, load_controlnet(controlnet_dir))
        if lora_dir:
            inf.load_lora(pipe, lora_dir)
            inf.set_lora_scale(pipe, lora_scale)
        prompts = [prompts[i % len(prompts)] for i in range(N_EVAL)]
        return inf.generate(pipe, prompts, conds, list(range(N_EVAL)), steps=20, cfg=1.0,
                            controlnet_scale=controlnet_scale)

    generate.points = points
    return generate


BASE_PROMPTS = ["a red circle", "a blue circle", "a yellow circle"]


def test_controlnet_places_the_disk_on_the_heatmap_peak(stage1, sampler):
    history = json.loads((stage1 / "training_complete.json").read_text())["history"]
    last = history[-1]
    ratio = last["val/loss_shuffled_condition"] / last["val/loss"]
    record("stage1_heldout_mse", {k: round(last[k], 5) for k in ("val/loss", "val/loss_shuffled_condition",
                                                                 "val/loss_no_control")})
    assert ratio >= 2.0, last
    t0 = time.perf_counter()
    hits = {}
    for scale in (1.0, 0.0):
        rate, err = S.hit_rate(sampler(stage1 / "controlnet", BASE_PROMPTS, scale), sampler.points, TOL)
        hits[scale] = rate
        record(f"stage1_hit_rate_scale{scale:g}", {"hit": rate, "mean_error_px": round(err, 2)})
    chance = S.chance_hit_rate(TOL)
    record("chance_hit_rate", chance)
    record("stage1_eval_s", round(time.perf_counter() - t0, 1))
    assert hits[1.0] >= 0.8
    assert hits[0.0] <= 3 * chance and hits[1.0] >= 4 * max(hits[0.0], chance)


@pytest.fixture(scope="module")
def stage2(stage1, toy):
    out = toy["root"] / "stage2"
    t0 = time.perf_counter()
    train(flags(toy, toy["white"], out, *STAGE2, "--train_unet_lora", "--controlnet_path", str(stage1 / "controlnet")))
    record("stage2_train_s", round(time.perf_counter() - t0, 1))
    return out


def test_lora_on_the_frozen_controlnet_teaches_white_and_keeps_positions(stage1, stage2, sampler, toy):
    import torch
    from diffusers import AutoencoderKL

    done = json.loads((stage2 / "training_complete.json").read_text())
    assert done["controlnet_unchanged"] is True
    # what the VAE can show at all: whiteness of reconstructed white disks (the LoRA's ceiling)
    vae = AutoencoderKL.from_pretrained(str(toy["base"] / "vae"))
    images, _, _ = S.scenes(N_EVAL, 5, (S.NEW_COLOUR,))
    with torch.no_grad():
        rec = vae.decode(vae.encode(S._to_tensor(images)).latent_dist.mean).sample
    ceiling = S.whiteness(((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    white, hits, cn_hits = {}, {}, {}
    t0 = time.perf_counter()
    for scale in (0.0, 0.5, 1.0):
        imgs = sampler(stage1 / "controlnet", ["a sks circle"], 1.0, stage2 / "lora", scale)
        white[scale] = S.whiteness(imgs)
        hits[scale], _ = S.hit_rate(imgs, sampler.points, TOL)
    cn_hits[1.0] = hits[1.0]
    for scale in (0.0, 0.5):
        imgs = sampler(stage1 / "controlnet", ["a sks circle"], scale, stage2 / "lora", 1.0)
        cn_hits[scale], _ = S.hit_rate(imgs, sampler.points, TOL)
    record("stage2_whiteness_by_lora_scale", {**{str(k): round(v, 3) for k, v in white.items()},
                                              "vae_ceiling": round(ceiling, 3)})
    record("stage2_hit_rate_by_lora_scale", {str(k): v for k, v in hits.items()})
    record("stage2_hit_rate_by_controlnet_scale", {str(k): v for k, v in sorted(cn_hits.items())})
    record("stage2_eval_s", round(time.perf_counter() - t0, 1))
    shift = (white[1.0] - white[0.0]) / (ceiling - white[0.0])
    record("stage2_share_of_reachable_whiteness", round(shift, 3))
    assert white[0.0] < white[0.5] < white[1.0]
    assert shift >= 0.35  # measured 0.47 (0.5 was the goal first proposed, for a 1000-step LoRA)
    assert hits[1.0] >= 0.8
    assert cn_hits[0.0] < cn_hits[0.5] <= cn_hits[1.0]
    assert np.isfinite(list(white.values())).all()

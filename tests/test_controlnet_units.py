"""Unit tests of the ControlNet library: radar axes and heatmaps, loss weighting, early stopping,
config sections, the single-file layout and the LoRA's PEFT copy (no training here)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from library.controlnet import radar, weighting
from library.controlnet.early_stopping import EarlyStopping
from library.errors import UserError


# --- radar axes and heatmaps -----------------------------------------------------------------------

def test_axis_convention_corners_and_round_trip():
    axes = radar.RadarAxes(range_max=200, vel_max=40)
    assert axes.to_pixel(0, -40, 64, 32) == (0.0, 31.0)      # range 0 at the bottom, -vel_max at the left
    assert axes.to_pixel(200, 40, 64, 32) == (63.0, 0.0)     # range_max at the top, +vel_max at the right
    assert axes.to_pixel(100, 0, 65, 33) == (32.0, 16.0)
    r, v = axes.from_pixel(*axes.to_pixel(85.2, -12.5, 512, 512), 512, 512)
    assert r == pytest.approx(85.2) and v == pytest.approx(-12.5)


def test_targets_outside_the_axes_are_dropped_with_a_warning():
    said = []
    targets = radar.parse_targets([{"range": 10, "velocity": 0}, {"range": 250, "velocity": 0},
                                   [50, -41]], "test")
    points = radar.target_points(targets, radar.RadarAxes(), (64, 64), "img.png", warn=said.append)
    assert points.shape == (1, 3) and len(said) == 1 and "2 target(s)" in said[0]


def test_bad_targets_are_user_errors():
    with pytest.raises(UserError, match="range"):
        radar.parse_targets([{"velocity": 1}], "line 3")
    with pytest.raises(UserError):
        radar.parse_targets({"range": 1}, "line 3")


def test_heatmap_peaks_at_the_targets_with_their_amplitude():
    points = np.array([[10, 20, 1.0], [40.0, 5.0, 0.5]], np.float32)
    heat = radar.render_heatmap(points, 64, 32, sigma=3.0)
    assert heat.shape == (32, 64) and heat.dtype == np.float32
    assert heat[20, 10] == pytest.approx(1.0) and heat[5, 40] == pytest.approx(0.5)
    assert heat.max() <= 1.0 and heat.min() >= 0.0
    # one sigma away: exp(-1/2)
    assert heat[20, 13] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert sorted(radar.peak_positions(heat, 0.4)) == [(10.0, 20.0), (40.0, 5.0)]
    assert radar.heatmap_rgb(heat).shape == (32, 64, 3)


def test_points_follow_the_data_library_resize_and_centre_crop():
    import cv2

    from library.data.buckets import BucketPlanner
    from library.data.transforms import resize_and_crop

    size = (200, 100)
    img = np.zeros((100, 200, 3), np.uint8)
    cv2.circle(img, (120, 30), 3, (255, 255, 255), -1)
    placement = BucketPlanner((64, 64)).place(size)  # covers 64x64: resize to 128x64, crop 32 px each side
    moved = radar.place_points(np.array([[120, 30, 1]], np.float32), size, placement.resized, placement.bucket)
    crop = resize_and_crop(img, placement).max(axis=2).astype(float)
    ys, xs = np.nonzero(crop > 100)
    assert moved[0, 0] == pytest.approx(xs.mean(), abs=0.6) and moved[0, 1] == pytest.approx(ys.mean(), abs=0.6)


# --- loss weighting --------------------------------------------------------------------------------

def _objective():
    import argparse

    from library.models.loading import make_noise_scheduler
    from library.training.diffusion import DiffusionObjective

    return DiffusionObjective(argparse.Namespace(), make_noise_scheduler(), "cpu")


def test_factor_zero_is_plain_mse_exactly():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    heat = torch.rand(3, 1, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900])
    objective = _objective()
    loss = weighting.weighted_loss(objective, pred, target, t, {}, heat, factor=0.0)
    assert torch.equal(loss, objective.loss(pred, target, t, {}))  # bit for bit what train_network computes
    # the per-sample means differ from one global mean only in float summation order
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-6, atol=0)


def test_weighted_loss_is_normalised_and_leans_on_the_peaks():
    objective, t = _objective(), torch.tensor([100])
    heat = torch.zeros(1, 1, 8, 8)
    heat[0, 0, 3, 4] = 1.0
    target = torch.zeros(1, 4, 8, 8)
    flat_err = torch.full((1, 4, 8, 8), 0.5)
    # a uniform error costs the same whatever the weights: normalisation by sum(w)
    assert weighting.weighted_loss(objective, flat_err, target, t, {}, heat, 30.0).item() == pytest.approx(0.25)
    at_peak, elsewhere = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    at_peak[..., 3, 4] = 1.0
    elsewhere[..., 0, 0] = 1.0
    plain = [weighting.weighted_loss(objective, e, target, t, {}, heat, 0.0).item() for e in (at_peak, elsewhere)]
    weighted = [weighting.weighted_loss(objective, e, target, t, {}, heat, 30.0).item() for e in (at_peak, elsewhere)]
    assert plain[0] == plain[1]
    assert weighted[0] > 10 * weighted[1]
    focal = weighting.weighted_loss(objective, at_peak + 0.01, target, t, {}, heat, 0.0, focal_gamma=2.0)
    assert focal.item() > weighting.weighted_loss(objective, at_peak + 0.01, target, t, {}, heat, 0.0).item()


def test_weight_map_is_highest_at_the_heatmap_peak_at_latent_size():
    heat = torch.from_numpy(radar.render_heatmap(np.array([[37, 21, 1.0]], np.float32), 64, 64, 2.0))[None, None]
    lat = weighting.latent_weight_source(heat, (8, 8))
    w = weighting.weight_map(lat, 30.0)
    assert w.shape == (1, 1, 8, 8)
    assert w.max().item() == pytest.approx(31.0, rel=1e-3)  # the peak survives max pooling at 1/8 size
    assert w[0, 0, 21 // 8, 37 // 8].item() == w.max().item()
    assert w[0, 0, 7, 0].item() == pytest.approx(1.0, abs=1e-3)  # far away: weight 1
    undilated = weighting.latent_weight_source(heat, (8, 8), dilate=0)
    assert (lat > 0.5).sum() > (undilated > 0.5).sum()  # dilation widens the weighted area


# --- early stopping --------------------------------------------------------------------------------

def test_early_stopping_on_a_flat_metric_stops_after_patience_epochs():
    stopper, extra = EarlyStopping(patience=3), {}
    stops = [stopper.update(1.0, extra, epoch).stop for epoch in range(1, 10)]
    assert stops.index(True) == 3  # epoch 1 sets the baseline, epochs 2-4 do not improve
    assert extra["early_stopping"]["best_epoch"] == 1


def test_early_stopping_improvement_resets_and_min_delta_counts():
    stopper, extra = EarlyStopping(patience=2, min_delta=0.1), {}
    decisions = [stopper.update(v, extra, i) for i, v in enumerate([1.0, 0.95, 0.8, 0.79, 0.78], 1)]
    assert [d.improved for d in decisions] == [True, False, True, False, False]
    assert decisions[-1].stop and decisions[-1].best == pytest.approx(0.8)
    resumed = EarlyStopping(patience=2, min_delta=0.1)  # a resumed run continues from the saved state
    assert resumed.update(0.9, json.loads(json.dumps(extra)), 6).bad_epochs == 3
    assert not EarlyStopping(None).update(1.0, {"early_stopping": {"best": 0.1, "best_epoch": 1,
                                                                   "bad_epochs": 50}}, 2).stop


# --- config sections -------------------------------------------------------------------------------

SEED_LORA_YAML = """
project:
  name: "radar_controlnet_lora"
  output_dir: "output/controlnet_lora"
data:
  data_dir: "dataset"
  resolution: 512
  range_max: 200
  vel_max: 40
training:
  train_batch_size: 2
  gradient_accumulation_steps: 4
  num_train_epochs: 5
  learning_rate: 5.0e-5
  lr_scheduler: "cosine"
  lr_warmup_steps: 500
  max_grad_norm: 1.0
  save_steps: 2000
  mixed_precision: "fp16"
  dataloader_num_workers: 4
  lora_rank: 16
  heatmap_sigma: 8.0
  loss_weight_factor: 30.0
  use_focal_loss: false
controlnet:
  path: "output/controlnet/controlnet"
early_stopping:
  enabled: true
  patience: 5
  min_delta: 0.0
"""


def test_the_seed_yaml_maps_onto_the_flags(tmp_path):
    import train_controlnet
    from library.controlnet.config import parse_args

    path = tmp_path / "config_lora.yaml"
    path.write_text(SEED_LORA_YAML)
    args = parse_args(train_controlnet.setup_parser(), train_controlnet.normalise_argv(
        ["--config", str(path), "--learning_rate", "1e-4"]))
    assert args.output_name == "radar_controlnet_lora" and args.output_dir == "output/controlnet_lora"
    assert args.train_data_dir == "dataset" and args.resolution == (512, 512)
    assert (args.range_max, args.vel_max, args.heatmap_sigma, args.loss_weight_factor) == (200, 40, 8.0, 30.0)
    assert (args.max_train_epochs, args.save_every_n_steps, args.max_data_loader_n_workers) == (5, 2000, 4)
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.lora_rank) == (2, 4, 16)
    assert args.controlnet_path == "output/controlnet/controlnet"
    assert (args.early_stopping_patience, args.early_stopping_min_delta) == (5, 0.0)
    assert args.learning_rate == 1e-4  # the command line wins
    assert not args.joint


def test_config_stage_sections_turn_on_joint_and_errors_name_the_key(tmp_path):
    import train_controlnet
    from library.controlnet.config import parse_args

    parser = train_controlnet.setup_parser
    joint = tmp_path / "config_joint.toml"
    joint.write_text('[stage1]\nloss_weight_factor = 100.0\nheatmap_sigma = 8.0\nnum_train_epochs = 60\n'
                     '[stage2]\nlora_learning_rate = 5e-5\nloss_weight_factor = 60.0\nnum_train_epochs = 5\n'
                     'learning_rate = 1e-6\n[early_stopping]\nenabled = false\npatience = 5\n')
    args = parse_args(parser(), ["--config_file", str(joint)])
    assert args.joint and args.loss_weight_factor == 100.0 and args.max_train_epochs == 60
    assert (args.stage2_loss_weight_factor, args.stage2_max_train_epochs) == (60.0, 5)
    assert (args.lora_learning_rate, args.stage2_learning_rate) == (5e-5, 1e-6)
    assert args.early_stopping_patience is None  # enabled = false
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lora_rnk: 4\n")
    with pytest.raises(UserError, match="training.lora_rnk.*lora_rank"):
        parse_args(parser(), ["--config_file", str(bad)])
    sigma = tmp_path / "sigma.yaml"
    sigma.write_text("stage1:\n  heatmap_sigma: 8\nstage2:\n  heatmap_sigma: 4\n")
    with pytest.raises(UserError, match="heatmap_sigma"):
        parse_args(parser(), ["--config_file", str(sigma)])


def test_autofilled_copy_keeps_the_seed_sections(tmp_path):
    import yaml

    from library.controlnet.config import write_autofilled

    src = tmp_path / "config_lora.yaml"
    src.write_text(SEED_LORA_YAML.replace('  path: "output/controlnet/controlnet"\n', ""))
    dst = write_autofilled(src, {"controlnet_path": "/abs/out/controlnet", "train_unet_lora": True,
                                 "pretrained_model_name_or_path": "/m/sd15.safetensors"})
    assert dst.name == "config_lora_autofilled.yaml"
    data = yaml.safe_load(dst.read_text())
    assert data["controlnet"]["path"] == "/abs/out/controlnet" and data["model"]["path"] == "/m/sd15.safetensors"
    assert data["train_unet_lora"] is True and data["training"]["lora_rank"] == 16
    flat = tmp_path / "flat.toml"
    flat.write_text('output_dir = "x"\n')
    assert "controlnet_path" in write_autofilled(flat, {"controlnet_path": "y"}).read_text()


# --- inference prompt files -------------------------------------------------------------------------

def test_prompt_lines_and_jsonl_give_jobs_with_targets_and_seeds(tmp_path):
    from library.controlnet.inference import jobs_from_text, read_jobs

    txt = tmp_path / "prompts.txt"
    txt.write_text("# comment\na radar map --targets 85.2,-12.5 120,3,0.8 --n noise --d 42 --s 30\n"
                   "another --cond c.png --l 3.5\n")
    jobs = read_jobs(txt, seed=100, images_per_prompt=2)
    assert [j.seed for j in jobs] == [42, 43, 102, 103]
    first, other = jobs[0], jobs[2]
    assert first.prompt == "a radar map" and first.negative == "noise" and first.steps == 30 and first.cfg is None
    assert [(t.range, t.velocity, t.amplitude) for t in first.targets] == [(85.2, -12.5, 1.0), (120.0, 3.0, 0.8)]
    assert other.prompt == "another" and other.condition_image == str(tmp_path / "c.png") and other.cfg == 3.5
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"text": "a map", "targets": [{"range": 5, "velocity": 1}], "seed": 7}) + "\n")
    (job,) = read_jobs(jsonl, seed=0)
    assert (job.prompt, job.seed, job.targets[0].range) == ("a map", 7, 5.0)
    (single,) = jobs_from_text("one --targets 1,2", False, tmp_path, "--prompt", seed=5)
    assert single.seed == 5 and single.targets[0].velocity == 2.0
    with pytest.raises(UserError, match="bad --targets"):
        jobs_from_text("x --targets 1;a,2", False, tmp_path, "--prompt", seed=5)

"""bench/run_all.py --quick end to end: every trainer runs (tiny model, 64 px, 3 steps) and the JSON
report carries every figure with a sane value. No timing thresholds: the harness measures, it does
not judge."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("network", "controlnet", "dual_unet")
POSITIVE = ("step_s_median", "step_s_min", "import_s", "model_load_s", "caching_s", "first_step_s",
            "time_to_first_step_s", "time_to_first_step_from_launch_s", "ttfs_over_load_and_caching",
            "peak_rss_gib", "caching_images_per_s", "bare_step_s_median", "bare_step_s_min", "ratio", "ratio_min",
            "bare_flops", "tflops_per_s")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--cpu",
                           "--cache_dir", str(root / "cache"), "--results_dir", str(root / "results")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((root / "results").glob("*.json"))
    assert len(files) == 1, files
    assert not list((root / "results").glob(".*.tmp")), "the report is written atomically"
    return json.loads(files[0].read_text()), proc.stdout


def test_every_trainer_has_every_field(quick_report):
    report, _ = quick_report
    sys.path.insert(0, str(REPO / "bench"))
    from run_all import FIELDS

    assert report["quick"] is True and report["cuda"] is False
    assert sorted(run["trainer"] for run in report["runs"]) == sorted(TRAINERS)
    for run in report["runs"]:
        assert "error" not in run, run
        missing = [f for f in FIELDS if f not in run]
        assert not missing, (run["trainer"], missing)
        assert run["resolution"] == 64 and run["batch_size"] == 1 and run["precision"] == "fp32"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_values_are_sane(quick_report, trainer):
    report, _ = quick_report
    run = next(r for r in report["runs"] if r["trainer"] == trainer)
    for field in POSITIVE:
        value = run[field]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (field, value)
    assert run["interpreter_s"] >= 0 and run["setup_other_s"] >= 0
    assert run["steps_measured"] == run["steps"] - 1 == len(run["step_times_s"])
    assert run["step_s_min"] <= run["step_s_median"]
    # time to first step holds the load, the caching and the first step
    assert run["time_to_first_step_s"] >= run["model_load_s"] + run["caching_s"] + run["first_step_s"] - 1e-3
    # ... and the startup figure is the same less one median step
    load_cache = run["model_load_s"] + run["caching_s"]
    assert run["startup_over_load_and_caching"] == pytest.approx(
        (run["time_to_first_step_s"] - run["step_s_median"]) / load_cache, rel=0.02, abs=0.01)  # rounding
    assert run["cached_images"] >= 2 * (trainer == "dual_unet") + 1  # dual_unet caches both modalities
    assert run["peak_cuda_gib"] is None and run["percent_of_peak"] is None  # CPU run
    if trainer == "network":
        assert run["ratio_full"] > 0 and run["bare_full_step_s_median"] > 0
    if trainer == "controlnet":  # no LoRA in a ControlNet step: no same-work step with one
        assert run["ratio_same_work"] is None and run["lora_flops_share"] is None
    else:
        assert run["bare_lora_step_s_median"] > 0 and run["ratio_same_work"] > 0
        assert run["ratio_same_work"] == pytest.approx(run["step_s_median"] / run["bare_lora_step_s_median"],
                                                       rel=0.02)


def test_flop_count_matches_the_frozen_unet_step(quick_report):
    """The bare step's FLOPs: network = one frozen UNet forward+backward, dual_unet = two of them."""
    report, _ = quick_report
    flops = {r["trainer"]: r["bare_flops"] for r in report["runs"]}
    assert flops["dual_unet"] == pytest.approx(2 * flops["network"])
    assert flops["controlnet"] > flops["network"] * 0.5


def test_lora_flops_are_counted_in_the_same_work_step(quick_report):
    """The LoRA modules add FLOPs to the bare step, by the same share for one UNet and for two."""
    report, _ = quick_report
    share = {r["trainer"]: r["lora_flops_share"] for r in report["runs"]}
    assert share["network"] > 0.05  # rank 32 on the tiny model: about as wide as its layers
    assert share["dual_unet"] == pytest.approx(share["network"], rel=1e-3)


def test_table_is_printed(quick_report):
    _, stdout = quick_report
    for trainer in TRAINERS:
        assert f"| {trainer}" in stdout
    assert "ratio" in stdout and "results:" in stdout


def test_too_few_steps_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--steps", "1",
                           "--cache_dir", str(tmp_path), "--results_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "at least 2" in proc.stderr

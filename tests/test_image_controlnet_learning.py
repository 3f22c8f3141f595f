"""The learning proof of train_image_controlnet.py on the toy world (slow: about 2 min of one CPU thread).

300 synthetic identities x 8 views at 32 px are written as a real data folder, trained through the
command-line entry point, and the saved checkpoint is judged on 12 NEW identities (none in training
or validation):
  - PSNR beats copying the frontal source by >= 2 dB, and drops by >= 1.5 dB with shuffled poses;
  - the pose is followed without trusting PSNR: per axis, the angle of the best-matching render of
    the known identity is within half the error of a uniform guess (an earlier experiment beat the
    copy baseline while ignoring yaw);
  - the model's own pose head is reported (and must beat chance).
The numbers go to test-artifacts/image_controlnet_learning.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 10   # 75 steps per epoch at batch 32: 750 optimizer steps


@pytest.mark.slow(cpu_minutes=2)
def test_model_follows_the_target_pose_on_new_identities(tmp_path):
    import train_image_controlnet as T
    from library.image_controlnet import proof, toy
    from library.image_controlnet.checkpoint import load_model

    start = time.process_time()
    data = toy.write_dataset(tmp_path / "data", train_identities=300, val_identities=15, views=8, size=32, seed=0)
    T.main(["--data_dir", str(data), "--backbone", "small", "--image_size", "32", "--feature_dim", "64",
            "--batch_size", "32", "--num_workers", "0", "--epochs", str(EPOCHS), "--lr", "3e-3",
            "--lr_warmup_steps", "50", "--save_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"),
            "--save_interval", str(EPOCHS), "--image_log_interval", str(EPOCHS)])
    trained = time.process_time()
    model, _ = load_model(tmp_path / "ck" / f"checkpoint_epoch_{EPOCHS}.pth")
    result = proof.evaluate(model, identities=12, views=6, seed=1000)
    result["cpu_seconds"] = {"data_and_training": trained - start, "evaluation": time.process_time() - trained}
    print(proof.format_result(result), result["cpu_seconds"])
    out = REPO / "test-artifacts" / "image_controlnet_learning.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    assert result["psnr_model"] - result["psnr_copy"] >= 2.0, result
    assert result["psnr_model"] - result["psnr_shuffled"] >= 1.5, result
    for axis, name in enumerate(("yaw", "pitch", "roll")):
        chance = result["abs_error_chance"][axis]
        assert result["abs_error_model"][axis] <= 0.5 * chance, (name, result)
        assert result["pose_head_error_deg"][axis] <= 0.75 * chance, (name, result)

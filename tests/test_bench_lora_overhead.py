"""bench/lora_overhead.py (the CPU proxy for the LoRA step's per-module overhead) runs and its figures
agree with each other. No timing thresholds: the bench measures, it does not judge."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import lora_overhead  # noqa: E402


def test_the_counter_counts_dispatched_ops_exactly():
    a, b = torch.randn(3, 4), torch.randn(4, 5)

    def step(phase):
        with phase("one"):
            torch.mm(a, b)
        with phase("three"):
            (a.t() @ a).relu_().sum()

    counts = lora_overhead.count_ops(step)
    assert counts["one"] == {"aten.mm.default": 1}
    assert sum(counts["three"].values()) == 4  # t, mm, relu_, sum


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    return lora_overhead.measure(rank=4, rounds=2, warmup=0)


def test_the_proxy_has_sd15s_lora_modules_and_the_trainers_optimizer(result):
    assert result["lora_modules"] == 192 and result["lora_tensors"] == 2 * 192
    assert result["optimizer"].endswith("AdamW")
    assert result["latent"] == 8 and result["rank"] == 4


def test_op_counts_add_up(result):
    ops = result["ops"]
    assert set(ops["bare"]) == {"forward", "backward", "total"}
    assert set(ops["lora"]) == {"forward", "backward", "optimizer", "total"}
    for step in ("bare", "lora"):
        assert ops[step]["total"] == sum(v for k, v in ops[step].items() if k != "total")
    assert ops["lora"]["optimizer"] > 0  # clip + the optimizer step are counted
    assert result["ops_ratio"] == pytest.approx(ops["lora"]["total"] / ops["bare"]["total"], abs=1e-3)
    extra = ops["lora"]["total"] - ops["bare"]["total"]
    assert sum(result["extra_ops_by_name"].values()) == extra
    assert result["extra_ops_per_lora_module"] == pytest.approx(extra / 192, abs=0.01)
    assert result["extra_ops_by_name"].get("aten.mm.default", 0) > 0  # the LoRA's matmuls are among them


def test_times_are_paired_and_the_ratio_is_their_medians(result):
    assert set(result["phase_s_mean"]["lora"]) == {"forward", "backward", "optimizer"}
    for key in ("bare_step_s", "lora_step_s", "bare_wall_s", "lora_wall_s"):
        assert len(result[key]) == result["rounds"] == 2 and all(t > 0 for t in result[key])
    assert result["time_ratio"] == pytest.approx(
        statistics.median(result["lora_step_s"]) / statistics.median(result["bare_step_s"]), rel=0.02)
    assert result["wall_ratio"] == pytest.approx(
        statistics.median(result["lora_wall_s"]) / statistics.median(result["bare_wall_s"]), rel=0.02)


def test_the_lora_step_trains_the_lora():
    proxy = lora_overhead.Proxy(rank=4)
    before = [p.detach().clone() for p in proxy.params]
    proxy.lora_step()
    proxy.lora_step()  # up starts at zero: the downs move from the second step on
    changed = sum(not torch.equal(a, p) for a, p in zip(before, proxy.params))
    assert changed == len(before)
    assert all(p.grad is None for p in proxy.params)  # zero_grad(set_to_none) as the trainer's loop


def test_the_script_prints_and_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "lora_overhead.py"), "--rounds", "1",
                           "--warmup", "0", "--rank", "4", "--results_dir", str(tmp_path), "--label", "t"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(tmp_path.glob("lora-overhead-*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    assert report["label"] == "t" and report["rounds"] == 1
    assert f"ratio {report['ops_ratio']:.3f}" in proc.stdout and str(files[0]) in proc.stdout

"""The toy-world experiment behind the learning test and bench/dual_unet_struct_lambda.py.

Train with train_dual_unet.py's command line (library/dual_unet/cli.py, in this process) on the
paired toy world over the cached toy base, then generate pairs from the final checkpoint with gen_pairs' code path and measure
(library/dual_unet/metrics.py):

- edge correlation of pairs from the same initial noise vs pairs from independent noise (chance),
  next to real registered pairs (ceiling) and shuffled real pairs (floor);
- redness (mean R - B) of each modality's samples, and how well it separates them;
- each modality's validation noise-prediction loss at step 0 (the base alone) and at the end;
- how far each LoRA moved (both must: one adapter silently left untrained is the trap).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from library.dual_unet import metrics, toy

DATA_SEED = 1000  # one dataset for every run: runs differ only in their training seed and settings


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    struct_lambda: float = 0.3
    hf_lambda: float = 0.5
    steps: int = 300
    pairs: int = 512
    batch: int = 16
    lr: float = 2e-3
    rank: int = 8
    network_args: tuple = ("conv_dim=8", "conv_alpha=8")  # LoCon: the small UNet's work is in its convs
    # Offset noise lets a LoRA move an image's overall colour at all (the base never saw orange or
    # black pictures): measured at seed 0, colour separation 0.57 with 0.1, 0.93 with 0.3.
    offset_noise: float = 0.3
    eval_pairs: int = 64
    sample_steps: int = 20


def _run_script(argv: list[str]) -> dict:
    from library.dual_unet.cli import main
    from library.training.accel import reset_accelerate

    reset_accelerate()  # a fresh accelerate state per in-process run
    return main(argv)


def lora_norms(folder: Path, modalities) -> dict[str, float]:
    from networks.lora_format import read_weights

    out = {}
    for m in modalities:
        weights = read_weights(folder / f"{m}.safetensors")
        out[m] = float(sum(v.float().norm() ** 2 for k, v in weights.items() if k.endswith("lora_up.weight")) ** 0.5)
    return out


def run(workdir, settings: Settings = Settings(), log=print) -> dict:
    from library.dual_unet.model import load_for_generation
    from library.dual_unet.outputs import read_log
    from library.dual_unet.sampling import generate_pairs
    from library.dual_unet.toy_base import ensure_toy_base

    s, workdir = settings, Path(workdir)
    base = ensure_toy_base(log=log)
    data = workdir / "data"
    if not (data / "fa" / f"{s.pairs - 1:04d}.png").is_file():
        toy.write_pair_dataset(data, count=s.pairs, seed=DATA_SEED, size=32)
    tag = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:6]
    name = f"seed{s.seed}_struct{s.struct_lambda:g}_{tag}"  # one run folder per setting
    t0 = time.perf_counter()
    result = _run_script([
        "--pretrained_model_name_or_path", str(base), "--data_dir", str(data), "--output_dir", str(workdir),
        "--name", name, "--resolution", "32", "--train_batch_size", str(s.batch), "--max_steps", str(s.steps),
        "--learning_rate", str(s.lr), "--unet_lora_rank", str(s.rank), "--seed", str(s.seed),
        "--struct_lambda", str(s.struct_lambda), "--hf_lambda", str(s.hf_lambda),
        "--offset_noise_strength", str(s.offset_noise), "--cache_latents", "--validation_split", "0.0625",
        "--validate_every", str(s.steps), "--sample_every", "0", "--log_every_n_steps", "10",
        *(["--network_args", *s.network_args] if s.network_args else [])])
    train_s = time.perf_counter() - t0
    run_dir = result["run"]
    t0 = time.perf_counter()
    model, dual, _ = load_for_generation(run_dir.checkpoint(s.steps))
    seeds = list(range(10_000, 10_000 + s.eval_pairs))
    a, b = generate_pairs(model, dual, seeds, resolution=32, steps=s.sample_steps, batch_size=32)
    _, b_ind = generate_pairs(model, dual, seeds, resolution=32, steps=s.sample_steps, batch_size=32, independent=True)
    real_a, real_b = toy.pair_images(s.eval_pairs, seed=DATA_SEED + 1, size=32)
    red_a, red_b = metrics.redness(a), metrics.redness(b)
    vals = read_log(run_dir.validation_log)
    out = {
        "settings": asdict(s),
        "edge_corr_same_noise": float(metrics.edge_correlation(a, b).mean()),
        "edge_corr_independent_noise": float(metrics.edge_correlation(a, b_ind).mean()),
        "edge_corr_real_pairs": float(metrics.edge_correlation(real_a, real_b).mean()),
        "edge_corr_real_shuffled": float(metrics.edge_correlation(real_a, np.roll(real_b, 1, axis=0)).mean()),
        "redness_a": float(red_a.mean()), "redness_b": float(red_b.mean()),
        "redness_real_a": float(metrics.redness(real_a).mean()), "redness_real_b": float(metrics.redness(real_b).mean()),
        "colour_separation": metrics.separation_accuracy(red_a, red_b),
        "val_first": {k: vals[0][k] for k in ("val_mse_a", "val_mse_b", "val_struct")},
        "val_last": {k: vals[-1][k] for k in ("val_mse_a", "val_mse_b", "val_struct")},
        "lora_up_norm": lora_norms(run_dir.checkpoint(s.steps), dual.modalities),
        "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    out["edge_corr_ratio"] = out["edge_corr_same_noise"] / max(out["edge_corr_independent_noise"], 1e-3)
    return out

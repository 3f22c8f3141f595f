#!/usr/bin/env python
"""Does --struct_lambda change how well generated pairs agree? The toy-world experiment
(library/dual_unet/proof.py) for each seed x struct_lambda, on one CPU thread.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dual_unet_struct_lambda.py --seeds 0 1 2 --lambdas 0 0.3

Prints one row per run and the mean +- std per lambda, and writes all numbers to
OUTPUT/results.json (default output/dual_unet_bench/). About 4-6 minutes of CPU per run; the toy
base is built once (a few minutes) and cached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output_dir", default="output/dual_unet_bench")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    from library.dual_unet.proof import Settings, run
    from library.fileio import write_json_atomic

    out = Path(args.output_dir)
    results = []
    cols = ("edge_corr_same_noise", "edge_corr_independent_noise", "colour_separation")
    print("seed  lambda  " + "  ".join(cols) + "  val_struct(last)  train_s")
    for lam in args.lambdas:
        for seed in args.seeds:
            r = run(out, Settings(seed=seed, struct_lambda=lam, steps=args.steps))
            results.append(r)
            write_json_atomic(out / "results.json", results)  # after every run: partial results survive
            print(f"{seed:4d}  {lam:6g}  " + "  ".join(f"{r[c]:{len(c)}.3f}" for c in cols)
                  + f"  {r['val_last']['val_struct']:16.4f}  {r['train_seconds']:7.0f}", flush=True)
    print("\nper lambda: mean +- std over seeds")
    for lam in args.lambdas:
        rows = [r for r in results if r["settings"]["struct_lambda"] == lam]
        cells = []
        for c in cols + ("edge_corr_ratio",):
            v = np.array([r[c] for r in rows])
            cells.append(f"{c} {v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"lambda {lam:g}: " + "; ".join(cells))
    ref = results[0]
    print(f"reference: real pairs {ref['edge_corr_real_pairs']:.3f}, shuffled real pairs "
          f"{ref['edge_corr_real_shuffled']:.3f}; redness real a/b {ref['redness_real_a']:.3f}/{ref['redness_real_b']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

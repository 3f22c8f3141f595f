"""Early stopping on an epoch metric (lower is better), with its state kept in the training state.

An epoch improves when its metric is below the best so far by more than `min_delta`; the first
epoch always sets the baseline. Training stops once `patience` epochs in a row did not improve,
so a flat metric stops after 1 + patience epochs. The state lives in the loop's `TrainState.extra`
(saved in every state folder), so a resumed run counts on where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KEY = "early_stopping"


@dataclass
class Decision:
    value: float
    improved: bool
    stop: bool
    bad_epochs: int
    best: float


class EarlyStopping:
    def __init__(self, patience: int | None, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = float(min_delta or 0.0)

    def update(self, value: float, extra: dict, epoch: int) -> Decision:
        state = extra.setdefault(KEY, {"best": None, "best_epoch": None, "bad_epochs": 0})
        best = state["best"]
        improved = math.isfinite(value) and (best is None or value < best - self.min_delta)
        if improved:
            state.update(best=float(value), best_epoch=int(epoch), bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        stop = bool(self.patience) and state["bad_epochs"] >= self.patience
        return Decision(value, improved, stop, state["bad_epochs"],
                        float("nan") if state["best"] is None else state["best"])

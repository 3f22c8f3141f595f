"""Deterministic validation loss, and the check that the ControlNet uses its condition.

Noise and timesteps come from a generator seeded per validation batch, so the same weights give the
same number every epoch (kohya's validation loss is built the same way): a flat curve means the
model did not change, which early stopping relies on. The same batches are also scored with the
conditions of other images (shuffled) and without control (scale 0); a ControlNet that uses its
condition scores clearly better with the true one (a metric that needs no sampling).
"""
from __future__ import annotations

import torch

VAL_SEED_OFFSET = 7_919  # keeps validation noise apart from the training noise stream


def shuffled(cond: torch.Tensor) -> torch.Tensor:
    """Each image gets another image's condition (a roll within the batch)."""
    return cond.roll(1, dims=0) if cond.shape[0] > 1 else cond.flip(-1)


@torch.no_grad()
def validation_losses(val_group, seed: int, encode_batch, forward, objective, loss_fn,
                      with_controls: bool = True) -> dict:
    """{"loss", "loss_shuffled_condition", "loss_no_control"} averaged over the validation set.

    encode_batch(batch) -> (latents, hidden, cond); forward(noisy, t, hidden, cond, scale) -> pred;
    loss_fn(pred, target, t, batch, cond) -> scalar (the stage's weighted loss, weights from the
    true condition in every variant so the three numbers are comparable).
    """
    sums = {"loss": 0.0, "loss_shuffled_condition": 0.0, "loss_no_control": 0.0}
    count = 0
    for index, batch in enumerate(val_group.epoch_dataset(0, seed)):
        latents, hidden, cond = encode_batch(batch)
        gen = torch.Generator(device=latents.device).manual_seed(seed + VAL_SEED_OFFSET + index)
        noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        t = torch.randint(objective.t_low, objective.t_high, (latents.shape[0],), generator=gen, device=latents.device)
        noisy, target = objective.add_noise(latents, noise, t), objective.target(latents, noise, t)
        n = latents.shape[0]
        sums["loss"] += float(loss_fn(forward(noisy, t, hidden, cond, 1.0), target, t, batch, cond)) * n
        if with_controls:
            pred = forward(noisy, t, hidden, shuffled(cond), 1.0)
            sums["loss_shuffled_condition"] += float(loss_fn(pred, target, t, batch, cond)) * n
            pred = forward(noisy, t, hidden, cond, 0.0)
            sums["loss_no_control"] += float(loss_fn(pred, target, t, batch, cond)) * n
        count += n
    out = {k: v / max(1, count) for k, v in sums.items()}
    if not with_controls:
        out = {"loss": out["loss"]}
    return out


class EpochEnd:
    """The loop's end_epoch hook: the epoch's weighted loss (averaged over the processes), the
    validation losses, early stopping, the best checkpoint; `history` keeps one row per epoch.
    compute_loss appends each step's loss to `losses`."""

    def __init__(self, args, accelerator, trainable, val_group, step_fns, writer, stopper, writes: bool):
        self.args, self.accelerator, self.trainable, self.val_group = args, accelerator, trainable, val_group
        self.encode, self.forward, self.objective, self.loss_of = step_fns
        self.writer, self.stopper, self.writes = writer, stopper, writes
        self.losses: list[torch.Tensor] = []
        self.history: list[dict] = []

    def __call__(self, epoch_done, step, extra) -> bool:
        from library.training.accel import reduce_sum

        accelerator, args = self.accelerator, self.args
        was_training = self.trainable.training
        self.trainable.eval()
        logs = {}
        if self.losses:  # the mean over all processes, so that every process decides alike
            mean = torch.stack(self.losses).float().mean().reshape(1)
            logs["loss/epoch_weighted"] = float(reduce_sum(accelerator, mean) / accelerator.num_processes)
            self.losses.clear()
        if self.val_group is not None:
            with accelerator.autocast():
                vals = validation_losses(self.val_group, args.seed, self.encode, self.forward, self.objective,
                                         self.loss_of)
            logs.update({f"val/{k}": v for k, v in vals.items()})
        metric = logs.get("val/loss", logs.get("loss/epoch_weighted", float("nan")))
        decision = self.stopper.update(metric, extra, epoch_done)
        logs["early_stopping/bad_epochs"] = decision.bad_epochs
        if accelerator.trackers:
            accelerator.log(logs, step=step)
        self.history.append({"epoch": epoch_done, "step": step, **logs, "improved": decision.improved})
        if decision.improved and (self.val_group is not None or args.early_stopping_patience) and self.writes:
            self.writer.save("best", epoch_done, step)
        self.trainable.train(was_training)
        if decision.stop:
            accelerator.print(f"early stopping: no improvement of {'val/loss' if self.val_group else 'the epoch loss'} "
                              f"for {decision.bad_epochs} epochs (best {decision.best:.5f}); stopping after "
                              f"epoch {epoch_done}.")
        return decision.stop

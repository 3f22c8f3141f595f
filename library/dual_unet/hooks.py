"""The dual-UNet trainer's loop hooks (library.training.loop.LoopHooks): its logs, validation and
best checkpoint, rolling and top-k checkpoints, and sample pairs.

Validation (hooks.validate) and the rolling checkpoints ("step" saves) follow on the loop's
schedule, in that order, so a checkpoint records the validation of its own step. The book of
best/validated/saved steps lives in the loop's TrainState (state.extra["dual_unet"]), so a resume
continues it.
"""
from __future__ import annotations

import random

from library.dual_unet import outputs, step as step_mod
from library.training import diffusion


class DualHooks:
    def __init__(self, args, accelerator, model, dual, val_group, run_folder, resume, latents_of, weights: dict,
                 max_train_steps: int, writes: bool, fast: int, dtype):
        self.args, self.accelerator, self.model, self.dual, self.val_group = args, accelerator, model, dual, val_group
        self.run_folder, self.resume, self.latents_of, self.weights = run_folder, resume, latents_of, weights
        self.max_train_steps, self.writes, self.fast, self.dtype = max_train_steps, writes, fast, dtype
        self.records: list[dict] = []  # each step's loss terms, averaged at the next log
        self.state = None  # the loop's TrainState (on_state), read when a checkpoint is written
        self.writer = self.optimizer = None  # set by the trainer once they exist
        self.train_log = self.val_log = None

    @property
    def book(self) -> dict:
        return self.state.extra["dual_unet"]

    def on_state(self, state) -> None:
        self.state = state
        state.extra.setdefault("dual_unet", {"best_val": None, "best_step": None, "saved_step": None,
                                             "validated_step": None})
        resumed_from = state.global_step if self.resume else None
        if self.writes:
            self.train_log = outputs.TextLog(self.run_folder.training_log, ["step", "epoch", *step_mod.TERMS, "lr"],
                                             resumed_from)
            self.val_log = outputs.TextLog(self.run_folder.validation_log,
                                           ["step", *[f"val_{k}" for k in step_mod.TERMS], "best"], resumed_from)
        if state.global_step == 0 and self.args.validate_every and not self.fast:
            self.log_validation(0, 0)  # the base alone (zero LoRAs): the baseline

    def validate(self, step_no: int, epoch: int) -> dict:
        args, accelerator, book = self.args, self.accelerator, self.book
        book["validated_step"] = step_no
        if self.val_group is None or not accelerator.is_main_process:
            return {}
        device = accelerator.device
        with accelerator.autocast():
            vals = step_mod.validation_losses(
                self.dual, self.val_group,
                lambda: diffusion.DiffusionObjective(args, self.model.noise_scheduler, device,
                                                     rng=random.Random(step_mod.VALIDATION_SEED)),
                self.latents_of, device, max_batches=self.fast or None, **self.weights)
        if self.fast:
            return {f"val/{k}": v for k, v in vals.items()}
        improved = book["best_val"] is None or vals["loss"] < book["best_val"]
        if improved:
            book.update(best_val=vals["loss"], best_step=step_no)
        self.val_log.write({"step": step_no, **{f"val_{k}": v for k, v in vals.items()}, "best": int(improved)})
        if improved:
            self.writer.save_best(epoch, step_no, {"val_loss": vals["loss"]})
        return {f"val/{k}": v for k, v in vals.items()}

    def log_validation(self, step_no: int, epoch: int) -> None:
        val_logs = self.validate(step_no, epoch)
        if self.accelerator.trackers and val_logs:
            self.accelerator.log(val_logs, step=step_no)

    def validate_now(self) -> dict:
        return self.validate(self.state.global_step, self.state.epoch)

    def save_latest(self, step_no: int, epoch: int):
        self.book["saved_step"] = step_no
        if self.accelerator.is_main_process:
            return self.writer.save_latest(epoch, step_no, {"best_val_loss": self.book["best_val"]})

    def after_step(self, step_no: int) -> dict:
        logs = {}
        if step_no % self.args.log_every_n_steps == 0 or step_no == self.max_train_steps:
            terms = step_mod.mean_terms(self.records)
            self.records.clear()
            logs = {f"loss/{k}": v for k, v in terms.items()}
            if self.train_log is not None:
                self.train_log.write({"step": step_no, "epoch": self.state.epoch + 1, **terms,
                                      "lr": self.optimizer.param_groups[0]["lr"]})
        return logs

    def save_model(self, kind, epoch, step_no):
        if kind == "top":  # --save_top_k: a whole checkpoint; the loop ranks, lists and deletes them
            folder = self.writer.write(self.run_folder.top_checkpoint(step_no), epoch, step_no,
                                       {"best_val_loss": self.book["best_val"]})
            self.accelerator.print(f"saved top-k checkpoint {folder}")
            return folder
        if kind == "step":
            return self.save_latest(step_no, epoch)
        if self.book["validated_step"] != step_no:  # the final weights get a validation too
            self.log_validation(step_no, epoch)
        if self.book["saved_step"] != step_no:
            self.save_latest(step_no, epoch)
        return self.run_folder.checkpoint(step_no)

    def want_sample(self, epoch, step_no) -> bool:
        args = self.args
        if epoch is not None or not args.sample_every or not args.num_sample_pairs:
            return False
        return step_no % args.sample_every == 0 and (step_no > 0 or args.sample_at_first)

    def sample(self, epoch, step_no) -> None:
        from library.dual_unet.sampling import generate_pairs, grid, save_pairs

        args, accelerator = self.args, self.accelerator
        if not accelerator.is_main_process:
            return
        seeds = [args.seed + i for i in range(args.num_sample_pairs)]  # the same noise at every sample step
        a, b = generate_pairs(self.model, self.dual, seeds, resolution=args.resolution, steps=args.sample_steps,
                              device=accelerator.device, dtype=self.dtype, sampler=args.sample_sampler)
        save_pairs(self.run_folder.samples(step_no), a, b, self.dual.modalities)
        tracker = accelerator.get_tracker("tensorboard", unwrap=False) if accelerator.trackers else None
        if tracker is not None:
            tracker.writer.add_image("samples/pairs", grid(a, b), step_no, dataformats="HWC")

"""The training loop shared by the trainers: epochs, accumulation, clipping, saving, resume, stop.

A trainer supplies `compute_loss(batch) -> scalar tensor` and a `save_model(name_kind, epoch, step)`
callback; the loop owns everything else. Data order comes from the dataset group, seeded by
(seed, epoch), so a resumed run skips exactly the batches it had already trained on.

Ctrl+C (or the GUI's Stop) does not kill a step half-way: the loop finishes the current optimizer
step, saves a state folder, says how to resume, and exits.

Several processes (accelerate launch / torchrun; DDP): build the group with `prepare_group(group,
accelerator.num_processes)` before counting steps, pass the trainable module unwrapped (no
accelerator.prepare of it; DeepSpeed and FSDP excepted), and draw noise through
DiffusionObjective.noisy_latents from a generator seeded the same on every process. Then every
process takes its share of each global batch (library.data.loader), draws its share of the global
batch's noise, weights its loss by its share, and the loop averages the gradients before clipping
and the optimizer step: the processes stay identical, and a run equals one process with the
batch size multiplied by the number of processes. Files, trackers, samples and the progress bar
belong to the main process; validation and logged losses are means over all processes.

Divergence guard: an optimizer step whose loss or gradient norm is NaN/Inf is skipped (the weights
keep their last finite values); `divergence_patience` such steps in a row stop the run with a
DivergedError that names the last good files, and nothing is saved after the first bad step, so
the last good model file and state folder stay as they were. Every model save is preceded by a
finiteness check of the trainable weights. Trainers with their own loop use DivergenceGuard too.

The output folder is locked for the run (library.training.output_lock): a second run with the same
--output_dir is refused, naming the process that holds it; pruning (--save_last_n_*) deletes only
files this run (or the run it resumes) wrote.

Trainer automation (Lightning's names in brackets): `save_top_k` / `monitor` / `monitor_mode`
keep the k best model files by a logged metric [ModelCheckpoint], `fast_dev_run` trains a few steps,
validates once and writes nothing, `prepare_group(..., overfit_batches=N)` trains on the first N
batches only [overfit_batches].
"""
from __future__ import annotations

import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from library.errors import UserError
from library.data.loader import BatchFeeder, OverfitGroup, shares_batches, use_global_batches
from library.training import accel
from library.training import noise as noise_mod
from library.training import live_requests
from library.training.checkpoint import (TopKSaver, TrainState, load_train_state, prune_old, save_train_state,
                                         state_dir_name)


class StopRequested(Exception):
    """Raised after a state save when the user asked the run to stop."""

    def __init__(self, state_path: Path | None):
        super().__init__(str(state_path))
        self.state_path = state_path


@dataclass
class LoopSettings:
    max_train_steps: int
    num_epochs: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    output_dir: Path
    output_name: str
    seed: int
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    log_every_n_steps: int = 1
    num_workers: int = 0
    persistent_workers: bool = False
    profile: bool = False
    # validation through hooks.validate: every N steps, else at the end of every N-th epoch (default 1)
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    save_top_k: int | None = None          # keep the k best model files by `monitor`
    monitor: str | None = None             # default: loss/validation with hooks.validate, else loss/epoch
    monitor_mode: str = "min"
    # > 0: this many steps, then one validation; the loop writes nothing (no saves, states, samples,
    # profile); trainer hooks that write on their own (end_epoch, on_state) must check it themselves
    fast_dev_run: int = 0
    # this many optimizer steps in a row with a NaN/Inf loss or gradient norm stop the run
    divergence_patience: int = 3


@dataclass
class LoopHooks:
    compute_loss: Callable[[dict], torch.Tensor]
    # (kind: "epoch"|"step"|"final"|"top", epoch, step) -> the file (or folder) written; "top" files
    # (save_top_k) are named with checkpoint.top_k_file_name, unless the trainer has its own layout
    save_model: Callable[[str, int, int], Path]
    trainable: torch.nn.Module                                  # what the state folder stores
    params_to_clip: list = field(default_factory=list)
    lr_names: list[str] = field(default_factory=list)            # one per optimizer param group
    after_step: Callable[[int], dict] | None = None               # e.g. max-norm; returns extra logs
    sample: Callable[[int | None, int], None] | None = None       # (epoch or None, step)
    want_sample: Callable[[int | None, int], bool] | None = None
    # (epochs done, step, state.extra) -> True to stop now (early stopping); runs before the epoch's
    # numbered save, so state folders hold what the hook wrote into state.extra
    end_epoch: Callable[[int, int, dict], bool] | None = None
    # Gets the run's live TrainState once, after a resume and before the first step: for trainers
    # that write their own checkpoints (with state) on their own schedule, e.g. train_dual_unet.
    on_state: Callable[[TrainState], None] | None = None
    # () -> metrics on held-out data, e.g. {"loss/validation": x}; runs on every process (it may
    # use collectives) on the schedule of LoopSettings.validate_every_n_*; the loop logs them
    validate: Callable[[], dict] | None = None


class DivergedError(UserError):
    """The run stopped because its loss or gradients stayed NaN/Inf; nothing was saved after it began."""


class DivergenceGuard:
    """Skip optimizer steps whose loss or gradient norm is not finite; stop after `patience` in a row.

    `step_ok(loss, grad_norm, step)` costs one host sync per optimizer step. With an fp16 GradScaler
    (`scaler_skips=True`) an Inf/NaN gradient is the scaler's business (it skips the step and lowers
    its scale), so only the loss counts. Record the files written while healthy with `saved(kind,
    path)`; the stop message names the newest of them.
    """

    def __init__(self, patience: int = 3, scaler_skips: bool = False, any_process=None):
        self.patience = max(1, int(patience or 1))
        self.scaler_skips = scaler_skips
        self.any_process = any_process or bool
        self.bad_in_a_row = 0
        self.first_bad_step: int | None = None
        self.last_good: dict[str, Path] = {}

    @property
    def healthy(self) -> bool:
        """No bad step since the last good one: saving now saves good weights."""
        return self.bad_in_a_row == 0

    def step_ok(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None, step: int) -> bool:
        """True: apply this step's update; False: skip it. Raises DivergedError at the patience limit."""
        checks = [t.detach().float().reshape(-1) for t in (loss, None if self.scaler_skips else grad_norm)
                  if isinstance(t, torch.Tensor)]
        bad = bool(self.any_process(bool(checks) and not bool(torch.isfinite(torch.cat(checks)).all())))
        if not bad:
            self.bad_in_a_row, self.first_bad_step = 0, None
            return True
        self.bad_in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        what = "loss" if loss is not None and not torch.isfinite(loss.detach()).all() else "gradient norm"
        if self.bad_in_a_row >= self.patience:
            raise self.error(f"the {what} was NaN or Inf for {self.bad_in_a_row} optimizer steps in a row "
                             f"(steps {self.first_bad_step}-{step}); those updates were skipped")
        if self.bad_in_a_row > 1:
            return False
        from library.logs import warn_once

        warn_once(f"step {step}: the {what} is NaN or Inf; this update is skipped (the run stops after "
                  f"{self.patience} such steps in a row, --divergence_patience).")
        return False

    def saved(self, kind: str, path) -> None:
        if path is None:
            return
        self.last_good[kind] = Path(path)
        if kind == "model" and (Path(path) / "state" / "train_state.json").is_file():
            self.last_good["state"] = Path(path) / "state"  # a checkpoint folder with its state (dual UNet)

    def error(self, what: str) -> DivergedError:
        model, state = self.last_good.get("model"), self.last_good.get("state")
        kept = [f"the newest good model file is {model}" if model else "no model file was saved before it",
                f"the newest good state is {state}" if state else
                "no state folder was saved before it (--save_state keeps them)"]
        fix = "lower --learning_rate (or use a warmup), keep --max_grad_norm on, or use --mixed_precision bf16 " \
              "instead of fp16"
        if state:
            fix += f"; then continue with --resume \"{state}\""
        return DivergedError(f"training diverged: {what}. The run stopped without saving anything more, so "
                             f"existing files were not replaced; {'; '.join(kept)}.", fix=fix + ".")

    def check_weights(self, module: torch.nn.Module, step: int) -> None:
        """Before a save: raise DivergedError if the trainable weights are no longer finite."""
        bad = [n for n, p in module.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise self.error(f"after step {step}, {len(bad)} trainable weights hold NaN or Inf (e.g. {bad[0]})")


class _StopFlag:
    """First SIGINT/SIGTERM asks for a clean stop; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: finishing this step and saving the state (press Ctrl+C again to abort)",
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_group(group, num_processes: int = 1, overfit_batches: int = 0):
    """The group as run_training feeds it; call before counting steps. With several processes its
    batches become global (each process trains on its share); with `overfit_batches` every epoch
    is the first N batches of epoch 0."""
    use_global_batches(group, num_processes)
    return OverfitGroup(group, overfit_batches) if overfit_batches else group


def monitored_metric(cfg: LoopSettings, hooks: LoopHooks) -> str:
    """The metric save_top_k ranks by: cfg.monitor, else the validation loss when there is one."""
    return cfg.monitor or ("loss/validation" if hooks.validate else "loss/epoch")


def automation_settings(args) -> dict:
    """LoopSettings fields from the flags of args.add_trainer_automation_arguments."""
    return {"save_top_k": getattr(args, "save_top_k", None), "monitor": getattr(args, "monitor", None),
            "monitor_mode": getattr(args, "monitor_mode", None) or "min",
            "fast_dev_run": getattr(args, "fast_dev_run", None) or 0, "profile": bool(getattr(args, "profile", False)),
            "divergence_patience": getattr(args, "divergence_patience", None) or 3}


def steps_and_epochs(num_batches_per_epoch: int, grad_accum: int, max_train_steps: int,
                     max_train_epochs: int | None) -> tuple[int, int]:
    """kohya's rule: --max_train_epochs overrides --max_train_steps; steps count optimizer updates."""
    updates_per_epoch = math.ceil(num_batches_per_epoch / grad_accum)
    if max_train_epochs:
        max_train_steps = max_train_epochs * updates_per_epoch
    return max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def run_training(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                 noise_generator: torch.Generator, progress_logger) -> TrainState:
    from library.training.output_lock import OutputDirLock

    writes = not cfg.fast_dev_run  # fast_dev_run: nothing at all is written
    lock = OutputDirLock(cfg.output_dir, cfg.output_name) if accelerator.is_main_process and writes else None
    if lock is not None:
        lock.acquire()  # also removes what killed runs of this output_name left half-written
    try:
        return _run_training(accelerator, group, optimizer, lr_scheduler, hooks, cfg, noise_generator,
                             progress_logger)
    finally:
        if lock is not None:
            lock.release()


def _run_training(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                  noise_generator: torch.Generator, progress_logger) -> TrainState:
    world, main = accelerator.num_processes, accelerator.is_main_process
    writes = not cfg.fast_dev_run  # fast_dev_run: nothing at all is written
    max_steps = min(cfg.max_train_steps, cfg.fast_dev_run) if cfg.fast_dev_run else cfg.max_train_steps
    state = TrainState(seed=cfg.seed, max_train_steps=cfg.max_train_steps)
    scaler = getattr(accelerator, "scaler", None)
    if cfg.resume:
        state = load_train_state(Path(cfg.resume), hooks.trainable, optimizer, lr_scheduler, noise_generator, scaler)
        state.max_train_steps = cfg.max_train_steps
        accelerator.print(f"resumed from {cfg.resume}: step {state.global_step}, epoch {state.epoch + 1}, "
                          f"batch {state.next_batch}")
    accel.broadcast_parameters(accelerator, hooks.trainable)  # identical start on every process
    if state.next_batch and state.next_batch >= group.num_batches_per_epoch:
        # the dataset shrank since the state was saved: its epoch is over for the smaller dataset
        accelerator.print(f"note: the state stopped at batch {state.next_batch} of epoch {state.epoch + 1}, but the "
                          f"dataset now has {group.num_batches_per_epoch} batches per epoch; continuing with "
                          f"epoch {state.epoch + 2}.")
        state.epoch, state.next_batch = state.epoch + 1, 0
    guard = DivergenceGuard(cfg.divergence_patience, scaler_skips=scaler is not None,
                            any_process=lambda flag: accel.any_process(accelerator, flag))
    trainable_params = [p for p in hooks.trainable.parameters() if p.requires_grad]
    if hooks.on_state:
        hooks.on_state(state)

    def save_state(name: str) -> Path | None:
        if not main or not writes:
            return None
        path = save_train_state(cfg.output_dir / name, state, hooks.trainable, optimizer, lr_scheduler,
                                noise_generator, scaler)
        guard.saved("state", path)
        return path

    top_k = None
    if cfg.save_top_k and main and writes:
        top_k = TopKSaver(cfg.save_top_k, monitored_metric(cfg, hooks), cfg.monitor_mode,
                          lambda epoch, step: _checked_save(hooks, guard, "top", epoch, step),
                          cfg.output_dir / f"{cfg.output_name}-top_k.json", state.extra.get("top_k"))

    def offer_top_k(metrics: dict, epoch: int, step: int) -> None:
        if top_k is not None and guard.healthy and top_k.offer(metrics, epoch, step) is not None:
            state.extra["top_k"] = top_k.entries  # the state folders carry the list on to --resume

    def validate(step: int) -> dict:
        metrics = hooks.validate()
        progress_logger.log(metrics, step)
        return metrics

    sharded = shares_batches(group, world)
    if not sharded:
        from library.logs import warn_once

        warn_once(f"{world} processes train on the same batches (this trainer does not split them); the "
                  "run trains like one process, only slower.")
    accum = cfg.gradient_accumulation_steps
    n_batches = group.num_batches_per_epoch
    progress_logger.start(total=max_steps, initial=state.global_step)
    sample = hooks.sample if writes else None
    written = state.extra.setdefault("written", [])  # names this run wrote: the only ones pruning deletes
    if sample and state.global_step == 0 and hooks.want_sample and hooks.want_sample(None, 0):
        sample(None, 0)

    profiler = Profiler(cfg.output_dir, accelerator) if cfg.profile and writes else None
    feeder = BatchFeeder(group, cfg.seed, cfg.num_workers, cfg.persistent_workers,
                         pin_memory=torch.cuda.is_available(), rank=accelerator.process_index if sharded else 0,
                         world=world if sharded else 1)
    with _StopFlag() as stop:
        while state.epoch < cfg.num_epochs and state.global_step < max_steps:
            epoch = state.epoch
            loader = feeder.epoch(epoch, start=state.next_batch)
            hooks.trainable.train()
            group_loss = None
            for index, batch in enumerate(loader, start=state.next_batch):
                sync = (index + 1) % accum == 0 or index + 1 == n_batches
                shard = batch.get("shard") if isinstance(batch, dict) else None
                with nullcontext() if sync else accelerator.no_sync(hooks.trainable):
                    with noise_mod.drawing_for(shard), accelerator.autocast():
                        loss = hooks.compute_loss(batch)
                    if shard is not None:
                        loss = loss * shard.loss_scale(world)
                    accelerator.backward(loss)
                progress_logger.add_loss(loss.detach())
                group_loss = loss.detach() if group_loss is None else group_loss + loss.detach()
                if not sync:
                    continue
                accel.average_gradients(accelerator, trainable_params)
                if cfg.max_grad_norm and hooks.params_to_clip:
                    grad_norm = accelerator.clip_grad_norm_(hooks.params_to_clip, cfg.max_grad_norm)
                elif scaler is None:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable_params if p.grad is not None])
                else:
                    grad_norm = None
                if guard.step_ok(group_loss, grad_norm, state.global_step + 1) or scaler is not None:
                    optimizer.step()  # a GradScaler skips a non-finite step itself (and must see it)
                group_loss = None
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.next_batch = index + 1
                if profiler is not None:
                    profiler.step(state.global_step)
                step = state.global_step
                metrics = dict(hooks.after_step(step) if hooks.after_step else {})
                validated = {}
                if hooks.validate and cfg.validate_every_n_steps and step % cfg.validate_every_n_steps == 0:
                    validated = hooks.validate()
                    metrics.update(validated)
                if step % cfg.log_every_n_steps == 0 or step == max_steps:
                    lrs = {f"lr/{name}": group_["lr"] for name, group_ in zip(hooks.lr_names, optimizer.param_groups)}
                    metrics.update(progress_logger.log_step(step, epoch, lrs, metrics))
                else:
                    progress_logger.log(validated, step)
                    progress_logger.tick()
                offer_top_k(metrics, epoch, step)

                if writes and guard.healthy and cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 \
                        and step < cfg.max_train_steps:
                    _save_numbered(accelerator, hooks, cfg, save_state, "step", epoch, step, guard, written)
                if sample and guard.healthy and hooks.want_sample and hooks.want_sample(None, step):
                    sample(None, step)
                if guard.healthy:
                    _honour_requests(accelerator, hooks, cfg, save_state, sample, writes, epoch, step, guard, written)
                if accel.any_process(accelerator, stop.requested):
                    path = _save_interrupted(hooks, guard, save_state, cfg, epoch, step) if guard.healthy else None
                    raise StopRequested(path)
                if step >= max_steps:
                    break
            if state.next_batch < n_batches:
                break  # max_train_steps was reached inside the epoch: the final save follows
            # The epoch ran to its end (its last batch may also have been the last step).
            state.epoch += 1
            state.next_batch = 0
            epoch_loss = progress_logger.end_epoch(state.epoch)
            metrics = {} if epoch_loss is None else {"loss/epoch": epoch_loss}
            done = state.epoch
            if hooks.validate and not cfg.validate_every_n_steps and done % (cfg.validate_every_n_epochs or 1) == 0:
                metrics.update(validate(state.global_step))
            stop_early = bool(hooks.end_epoch and hooks.end_epoch(done, state.global_step, state.extra))
            offer_top_k(metrics, done, state.global_step)
            if writes and guard.healthy and cfg.save_every_n_epochs and done % cfg.save_every_n_epochs == 0 \
                    and done < cfg.num_epochs and state.global_step < cfg.max_train_steps:
                _save_numbered(accelerator, hooks, cfg, save_state, "epoch", done, state.global_step, guard, written)
            if sample and guard.healthy and hooks.want_sample and hooks.want_sample(done, state.global_step):
                sample(done, state.global_step)
            if stop_early:
                break  # the final save follows

    if top_k is not None:
        top_k.warn_if_never_offered()
    if cfg.fast_dev_run:
        if hooks.validate:
            metrics = hooks.validate()
            shown = ", ".join(f"{k} {v:.5f}" for k, v in metrics.items())
            accelerator.print(f"fast_dev_run: validation {shown}")
        accelerator.print(f"fast_dev_run: {state.global_step} training steps ran; nothing was saved.")
    accelerator.wait_for_everyone()
    if writes and not guard.healthy:  # the run ended inside a streak of skipped steps
        raise guard.error(f"the last {guard.bad_in_a_row} optimizer steps (from step {guard.first_bad_step}) had a "
                          "NaN or Inf loss or gradient norm and were skipped")
    if main and writes:
        model_path = _checked_save(hooks, guard, "final", state.epoch, state.global_step)
        if cfg.save_state or cfg.save_state_on_train_end:
            _save_state_after_model(save_state, state_dir_name(cfg.output_name), model_path)
    progress_logger.close()
    return state


def run_training_or_exit(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                         noise_generator: torch.Generator, progress_logger, resume_latest: bool = False) -> TrainState:
    """run_training for a training script: after Ctrl+C (or the GUI's Stop) the loop has saved a
    state; close the progress bar and the trackers, say how to continue, and exit with 130 as an
    interrupted program does. `resume_latest`: the script also takes `--resume latest`."""
    try:
        return run_training(accelerator, group, optimizer, lr_scheduler, hooks, cfg, noise_generator, progress_logger)
    except UserError:  # diverged, disk full, output folder taken: the message says it all
        progress_logger.close()
        accelerator.end_training()
        raise
    except StopRequested as stop:
        progress_logger.close()
        accelerator.end_training()
        hint = f'--resume "{stop.state_path}"'
        if resume_latest:
            hint = f"--resume latest (or {hint})"
        accelerator.print(f"stopped at step {progress_logger.bar.n}. State saved in {stop.state_path}; continue "
                          f"with {hint} and the same other arguments.")
        raise SystemExit(130) from None


def _honour_requests(accelerator, hooks, cfg: LoopSettings, save_state, sample, writes: bool, epoch: int,
                     step: int, guard: DivergenceGuard, written: list):
    """"Save now" / "sample now" (library.training.live_requests: files in the output folder)."""
    asked = live_requests.take_everywhere(accelerator, cfg.output_dir, writes)
    if live_requests.SAVE in asked:
        accelerator.print(f"save now (requested): saving at step {step}")
        _save_numbered(accelerator, hooks, cfg, save_state, "step", epoch, step, guard, written)
    if live_requests.SAMPLE in asked:
        if sample is None:
            accelerator.print("sample now (requested): this run has no --sample_prompts, nothing to sample")
        else:
            accelerator.print(f"sample now (requested): sampling at step {step}")
            sample(None, step)


def _checked_save(hooks: LoopHooks, guard: DivergenceGuard, kind: str, epoch: int, step: int) -> Path | None:
    """hooks.save_model after checking that the trainable weights are finite (DivergedError if not)."""
    guard.check_weights(hooks.trainable, step)
    path = hooks.save_model(kind, epoch, step)
    guard.saved("model", path)
    return path


def _save_state_after_model(save_state, name: str, model_path) -> Path | None:
    """The state after its model file: with a full disk the (small) model file is kept and said so."""
    from library.fileio import DiskFullError

    try:
        return save_state(name)
    except DiskFullError as err:
        if not model_path:
            raise
        raise DiskFullError(f"{str(err).split(' Fix: ')[0]} The model file {model_path} was saved; only the state "
                            f"folder {name} is missing.", fix=err.fix) from None


def _save_interrupted(hooks, guard, save_state, cfg: LoopSettings, epoch: int, step: int) -> Path | None:
    """The state for Ctrl+C; on a full disk the (small) model file alone, so the trained weights survive."""
    from library.fileio import DiskFullError

    try:
        return save_state(f"{cfg.output_name}-interrupted-state")
    except DiskFullError as err:
        try:
            path = _checked_save(hooks, guard, "step", epoch, step)
        except DiskFullError:
            raise err from None
        raise DiskFullError(f"{str(err).split(' Fix: ')[0]} The trained weights were saved alone instead: {path}.",
                            fix=err.fix) from None


def _save_numbered(accelerator, hooks, cfg: LoopSettings, save_state, kind: str, epoch: int, step: int,
                   guard: DivergenceGuard, written: list):
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    path = _checked_save(hooks, guard, kind, epoch, step)
    if path is not None:
        written.append(Path(path).name)
    numbered = {"epoch": epoch} if kind == "epoch" else {"step": step}
    if cfg.save_state:
        name = state_dir_name(cfg.output_name, **numbered)
        written.append(name)  # before the save: the folder's own record lists it
        _save_state_after_model(save_state, name, path)
    keep = cfg.save_last_n_epochs if kind == "epoch" else None
    if kind == "step" and cfg.save_last_n_steps and cfg.save_every_n_steps:
        keep = max(1, cfg.save_last_n_steps // cfg.save_every_n_steps)
    if keep:
        for suffix in (".safetensors", ".ckpt", ".pt", "-state"):
            for gone in prune_old(cfg.output_dir, cfg.output_name, kind, keep, suffix, only=set(written)):
                written.remove(gone.name)


class Profiler:
    """--profile: trace steps 3-7 with the torch profiler, print where the time goes, save a trace.
    `accelerator` is anything with .print (an Accelerator, or accelerate's PartialState); call
    `step(n)` after optimizer step n."""

    FIRST, LAST = 3, 7

    def __init__(self, output_dir: Path, accelerator):
        self.output_dir, self.accelerator, self.prof = Path(output_dir), accelerator, None

    def step(self, step: int):
        from torch.profiler import ProfilerActivity, profile

        if step == self.FIRST - 1:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=False)
            self.prof.__enter__()
        elif step == self.LAST and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.accelerator.print(f"profile of steps {self.FIRST}-{self.LAST}:")
            self.accelerator.print(self.prof.key_averages().table(sort_by=sort, row_limit=25))
            trace = self.output_dir / "profile_trace.json"
            self.prof.export_chrome_trace(str(trace))
            self.accelerator.print(f"trace for chrome://tracing or Perfetto: {trace}")
            self.prof = None

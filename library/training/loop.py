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

Trainer automation (Lightning's names in brackets): `save_top_k` / `monitor` / `monitor_mode`
keep the k best model files by a logged metric [ModelCheckpoint], `fast_dev_run` trains a few steps,
validates once and writes nothing, `prepare_group(..., overfit_batches=N)` trains on the first N
batches only [overfit_batches].
"""
from __future__ import annotations

import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from library.data.loader import BatchFeeder, OverfitGroup, shares_batches, use_global_batches
from library.training import accel
from library.training import noise as noise_mod
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
    save_last_n_epochs_state: int | None = None  # state folders; None: as save_last_n_epochs (kohya)
    save_last_n_steps_state: int | None = None
    # kohya's --initial_epoch / --initial_step / --skip_until_initial_step (see start_position)
    initial_epoch: int | None = None
    initial_step: int | None = None
    skip_until_initial_step: bool = False
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
            "save_last_n_epochs_state": getattr(args, "save_last_n_epochs_state", None),
            "save_last_n_steps_state": getattr(args, "save_last_n_steps_state", None),
            "initial_epoch": getattr(args, "initial_epoch", None), "initial_step": getattr(args, "initial_step", None),
            "skip_until_initial_step": bool(getattr(args, "skip_until_initial_step", False))}


def start_position(initial_epoch: int | None, initial_step: int | None, skip: bool, batches_per_epoch: int,
                   grad_accum: int) -> tuple[int, int, int] | None:
    """(global step, epoch index, first batch) for --initial_step/--initial_epoch; None when neither is given.

    kohya's train_network.py: --initial_step wins over --initial_epoch ((epoch - 1) x updates per epoch);
    the run starts in the epoch that holds that step. With --skip_until_initial_step it starts at that
    step's batch and counts steps from it; without, it starts at the beginning of that epoch and counts
    steps from 0 (so it trains up to --max_train_steps more, within the remaining epochs).
    """
    if initial_step is None and initial_epoch is None:
        return None
    updates = math.ceil(batches_per_epoch / grad_accum)
    step = initial_step if initial_step is not None else (initial_epoch - 1) * updates
    epoch = step // updates
    if not skip:
        return 0, epoch, 0
    return step, epoch, (step - epoch * updates) * grad_accum


def steps_and_epochs(num_batches_per_epoch: int, grad_accum: int, max_train_steps: int,
                     max_train_epochs: int | None) -> tuple[int, int]:
    """kohya's rule: --max_train_epochs overrides --max_train_steps; steps count optimizer updates."""
    updates_per_epoch = math.ceil(num_batches_per_epoch / grad_accum)
    if max_train_epochs:
        max_train_steps = max_train_epochs * updates_per_epoch
    return max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def is_schedule_free(optimizer) -> bool:
    """A schedule-free optimizer (schedulefree's AdamWScheduleFree, ...): it has train()/eval() modes."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def in_eval_mode(optimizer, fn):
    """fn run with a schedule-free optimizer in eval mode (the parameters hold the averaged weights that
    are sampled and saved), then back in train mode: kohya's optimizer_eval_fn / optimizer_train_fn."""
    if fn is None or not is_schedule_free(optimizer):
        return fn
    inner = getattr(optimizer, "optimizer", optimizer)

    def wrapped(*args, **kwargs):
        inner.eval()
        try:
            return fn(*args, **kwargs)
        finally:
            inner.train()

    return wrapped


def run_training(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                 noise_generator: torch.Generator, progress_logger) -> TrainState:
    world, main = accelerator.num_processes, accelerator.is_main_process
    writes = not cfg.fast_dev_run  # fast_dev_run: nothing at all is written
    if is_schedule_free(optimizer):  # samples, validation and saves see the averaged weights (kohya)
        hooks = replace(hooks, save_model=in_eval_mode(optimizer, hooks.save_model),
                        sample=in_eval_mode(optimizer, hooks.sample), validate=in_eval_mode(optimizer, hooks.validate))
    max_steps = min(cfg.max_train_steps, cfg.fast_dev_run) if cfg.fast_dev_run else cfg.max_train_steps
    state = TrainState(seed=cfg.seed, max_train_steps=cfg.max_train_steps)
    scaler = getattr(accelerator, "scaler", None)
    if cfg.resume:
        state = load_train_state(Path(cfg.resume), hooks.trainable, optimizer, lr_scheduler, noise_generator, scaler)
        state.max_train_steps = cfg.max_train_steps
        accelerator.print(f"resumed from {cfg.resume}: step {state.global_step}, epoch {state.epoch + 1}, "
                          f"batch {state.next_batch}")
    start = start_position(cfg.initial_epoch, cfg.initial_step, cfg.skip_until_initial_step,
                           group.num_batches_per_epoch, cfg.gradient_accumulation_steps)
    if start is not None:  # overrides a resumed state's position, as kohya (the lr schedule is not moved)
        if start[0] >= cfg.max_train_steps:
            from library.errors import UserError

            raise UserError(f"--initial_step/--initial_epoch start at step {start[0]}, not below --max_train_steps "
                            f"({cfg.max_train_steps}).", fix="raise --max_train_steps or start earlier.")
        state.global_step, state.epoch, state.next_batch = start
        accelerator.print(f"starting at step {state.global_step}, epoch {state.epoch + 1}, batch {state.next_batch}")
    accel.broadcast_parameters(accelerator, hooks.trainable)  # identical start on every process
    trainable_params = [p for p in hooks.trainable.parameters() if p.requires_grad]
    if hooks.on_state:
        hooks.on_state(state)

    def save_state(name: str) -> Path | None:
        if not main or not writes:
            return None
        return save_train_state(cfg.output_dir / name, state, hooks.trainable, optimizer, lr_scheduler,
                                noise_generator, scaler)

    save_state = in_eval_mode(optimizer, save_state)

    top_k = None
    if cfg.save_top_k and main and writes:
        top_k = TopKSaver(cfg.save_top_k, monitored_metric(cfg, hooks), cfg.monitor_mode,
                          lambda epoch, step: hooks.save_model("top", epoch, step),
                          cfg.output_dir / f"{cfg.output_name}-top_k.json", state.extra.get("top_k"))

    def offer_top_k(metrics: dict, epoch: int, step: int) -> None:
        if top_k is not None and top_k.offer(metrics, epoch, step) is not None:
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
                if not sync:
                    continue
                accel.average_gradients(accelerator, trainable_params)
                if cfg.max_grad_norm and hooks.params_to_clip:
                    accelerator.clip_grad_norm_(hooks.params_to_clip, cfg.max_grad_norm)
                optimizer.step()
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

                if writes and cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 \
                        and step < cfg.max_train_steps:
                    _save_numbered(accelerator, hooks, cfg, save_state, "step", epoch, step)
                if sample and hooks.want_sample and hooks.want_sample(None, step):
                    sample(None, step)
                if accel.any_process(accelerator, stop.requested):
                    path = save_state(f"{cfg.output_name}-interrupted-state")
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
            if writes and cfg.save_every_n_epochs and done % cfg.save_every_n_epochs == 0 \
                    and done < cfg.num_epochs and state.global_step < cfg.max_train_steps:
                _save_numbered(accelerator, hooks, cfg, save_state, "epoch", done, state.global_step)
            if sample and hooks.want_sample and hooks.want_sample(done, state.global_step):
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
    if main and writes:
        hooks.save_model("final", state.epoch, state.global_step)
        if cfg.save_state or cfg.save_state_on_train_end:
            save_state(state_dir_name(cfg.output_name))
    progress_logger.close()
    return state


def run_training_or_exit(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                         noise_generator: torch.Generator, progress_logger, resume_latest: bool = False) -> TrainState:
    """run_training for a training script: after Ctrl+C (or the GUI's Stop) the loop has saved a
    state; close the progress bar and the trackers, say how to continue, and exit with 130 as an
    interrupted program does. `resume_latest`: the script also takes `--resume latest`."""
    try:
        return run_training(accelerator, group, optimizer, lr_scheduler, hooks, cfg, noise_generator, progress_logger)
    except StopRequested as stop:
        progress_logger.close()
        accelerator.end_training()
        hint = f'--resume "{stop.state_path}"'
        if resume_latest:
            hint = f"--resume latest (or {hint})"
        accelerator.print(f"stopped at step {progress_logger.bar.n}. State saved in {stop.state_path}; continue "
                          f"with {hint} and the same other arguments.")
        raise SystemExit(130) from None


def _save_numbered(accelerator, hooks, cfg: LoopSettings, save_state, kind: str, epoch: int, step: int):
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    hooks.save_model(kind, epoch, step)
    numbered = {"epoch": epoch} if kind == "epoch" else {"step": step}
    if cfg.save_state:
        save_state(state_dir_name(cfg.output_name, **numbered))
    def kept(last_n_epochs, last_n_steps):
        if kind == "epoch":
            return last_n_epochs
        if last_n_steps and cfg.save_every_n_steps:
            return max(1, last_n_steps // cfg.save_every_n_steps)
        return None

    keep = kept(cfg.save_last_n_epochs, cfg.save_last_n_steps)
    # kohya's save_and_remove_state_*: --save_last_n_*_state, else the model files' --save_last_n_*
    keep_state = kept(cfg.save_last_n_epochs_state, cfg.save_last_n_steps_state) or keep
    if keep:
        for suffix in (".safetensors", ".ckpt", ".pt"):
            prune_old(cfg.output_dir, cfg.output_name, kind, keep, suffix)
    if keep_state:
        prune_old(cfg.output_dir, cfg.output_name, kind, keep_state, "-state")


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

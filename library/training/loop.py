"""The training loop shared by the trainers: epochs, accumulation, clipping, saving, resume, stop.

A trainer supplies `compute_loss(batch) -> scalar tensor` and a `save_model(name_kind, epoch, step)`
callback; the loop owns everything else. Data order comes from the dataset group, seeded by
(seed, epoch), so a resumed run skips exactly the batches it had already trained on.

Ctrl+C (or the GUI's Stop) does not kill a step half-way: the loop finishes the current optimizer
step, saves a state folder, says how to resume, and exits.
"""
from __future__ import annotations

import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from library.data.loader import BatchFeeder
from library.training.checkpoint import (TrainState, load_train_state, prune_old, save_train_state,
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


@dataclass
class LoopHooks:
    compute_loss: Callable[[dict], torch.Tensor]
    save_model: Callable[[str, int, int], Path]   # (kind: "epoch"|"step"|"final", epoch, step) -> file
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


def steps_and_epochs(num_batches_per_epoch: int, grad_accum: int, max_train_steps: int,
                     max_train_epochs: int | None) -> tuple[int, int]:
    """kohya's rule: --max_train_epochs overrides --max_train_steps; steps count optimizer updates."""
    updates_per_epoch = math.ceil(num_batches_per_epoch / grad_accum)
    if max_train_epochs:
        max_train_steps = max_train_epochs * updates_per_epoch
    return max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def run_training(accelerator, group, optimizer, lr_scheduler, hooks: LoopHooks, cfg: LoopSettings,
                 noise_generator: torch.Generator, progress_logger) -> TrainState:
    state = TrainState(seed=cfg.seed, max_train_steps=cfg.max_train_steps)
    scaler = getattr(accelerator, "scaler", None)
    if cfg.resume:
        state = load_train_state(Path(cfg.resume), hooks.trainable, optimizer, lr_scheduler, noise_generator, scaler)
        state.max_train_steps = cfg.max_train_steps
        accelerator.print(f"resumed from {cfg.resume}: step {state.global_step}, epoch {state.epoch + 1}, "
                          f"batch {state.next_batch}")
    if hooks.on_state:
        hooks.on_state(state)

    def save_state(name: str) -> Path | None:
        if not accelerator.is_main_process:
            return None
        return save_train_state(cfg.output_dir / name, state, hooks.trainable, optimizer, lr_scheduler,
                                noise_generator, scaler)

    accum = cfg.gradient_accumulation_steps
    n_batches = group.num_batches_per_epoch
    progress_logger.start(total=cfg.max_train_steps, initial=state.global_step)
    if hooks.sample and state.global_step == 0 and hooks.want_sample and hooks.want_sample(None, 0):
        hooks.sample(None, 0)

    profiler = _Profiler(cfg.output_dir, accelerator) if cfg.profile else None
    feeder = BatchFeeder(group, cfg.seed, cfg.num_workers, cfg.persistent_workers,
                         pin_memory=torch.cuda.is_available())
    with _StopFlag() as stop:
        while state.epoch < cfg.num_epochs and state.global_step < cfg.max_train_steps:
            epoch = state.epoch
            loader = feeder.epoch(epoch, start=state.next_batch)
            hooks.trainable.train()
            for index, batch in enumerate(loader, start=state.next_batch):
                sync = (index + 1) % accum == 0 or index + 1 == n_batches
                with nullcontext() if sync else accelerator.no_sync(hooks.trainable):
                    with accelerator.autocast():
                        loss = hooks.compute_loss(batch)
                    accelerator.backward(loss)
                progress_logger.add_loss(loss.detach())
                if not sync:
                    continue
                if cfg.max_grad_norm and hooks.params_to_clip:
                    accelerator.clip_grad_norm_(hooks.params_to_clip, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.next_batch = index + 1
                if profiler is not None:
                    profiler.step(state.global_step)
                extra = hooks.after_step(state.global_step) if hooks.after_step else {}
                step = state.global_step
                if step % cfg.log_every_n_steps == 0 or step == cfg.max_train_steps:
                    lrs = {f"lr/{name}": group_["lr"] for name, group_ in zip(hooks.lr_names, optimizer.param_groups)}
                    progress_logger.log_step(step, epoch, lrs, extra)
                else:
                    progress_logger.tick()

                if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < cfg.max_train_steps:
                    _save_numbered(accelerator, hooks, cfg, save_state, "step", epoch, step)
                if hooks.sample and hooks.want_sample and hooks.want_sample(None, step):
                    hooks.sample(None, step)
                if stop.requested:
                    path = save_state(f"{cfg.output_name}-interrupted-state")
                    raise StopRequested(path)
                if step >= cfg.max_train_steps:
                    break
            if state.next_batch < n_batches:
                break  # max_train_steps was reached inside the epoch: the final save follows
            # The epoch ran to its end (its last batch may also have been the last step).
            state.epoch += 1
            state.next_batch = 0
            progress_logger.end_epoch(state.epoch)
            done = state.epoch
            stop_early = bool(hooks.end_epoch and hooks.end_epoch(done, state.global_step, state.extra))
            if cfg.save_every_n_epochs and done % cfg.save_every_n_epochs == 0 and done < cfg.num_epochs \
                    and state.global_step < cfg.max_train_steps:
                _save_numbered(accelerator, hooks, cfg, save_state, "epoch", done, state.global_step)
            if hooks.sample and hooks.want_sample and hooks.want_sample(done, state.global_step):
                hooks.sample(done, state.global_step)
            if stop_early:
                break  # the final save follows

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        hooks.save_model("final", state.epoch, state.global_step)
        if cfg.save_state or cfg.save_state_on_train_end:
            save_state(state_dir_name(cfg.output_name))
    progress_logger.close()
    return state


def _save_numbered(accelerator, hooks, cfg: LoopSettings, save_state, kind: str, epoch: int, step: int):
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    hooks.save_model(kind, epoch, step)
    numbered = {"epoch": epoch} if kind == "epoch" else {"step": step}
    if cfg.save_state:
        save_state(state_dir_name(cfg.output_name, **numbered))
    keep = cfg.save_last_n_epochs if kind == "epoch" else None
    if kind == "step" and cfg.save_last_n_steps and cfg.save_every_n_steps:
        keep = max(1, cfg.save_last_n_steps // cfg.save_every_n_steps)
    if keep:
        for suffix in (".safetensors", ".ckpt", ".pt", "-state"):
            prune_old(cfg.output_dir, cfg.output_name, kind, keep, suffix)


class _Profiler:
    """--profile: trace steps 3-7 with the torch profiler, print where the time goes, save a trace."""

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

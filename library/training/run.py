"""The run skeleton the diffusion trainers share (train_network, train_controlnet, train_dual_unet).

Every trainer does the same steps around the shared loop (library.training.loop); a trainer keeps
only what differs: which model it builds and trains, its loss, and its output files.

    run = begin(args)                          # seed common to all processes, main process, fast_dev_run
    ... check folders, build the datasets ...  # preflight: bad input fails in seconds
    group = run.start(tracker_dir, group)      # seeds, Accelerator, per-process batch split, messages
    model, vae_dtype = run.load_model()        # load, freeze; the VAE precision by one rule
    run.cache_latents([group, val], model.vae, vae_dtype)   # the main process first (disk caches)
    ... the trainer's networks, params ...
    opt = run.optimization(params, group.num_batches_per_epoch)   # optimizer, schedule, prepare
    settings = loop_settings(args, opt, output_dir, ...)          # LoopSettings from the flags
    run.start_trackers(name)                   # --log_config, --wandb_run_name, --log_tracker_config
    state = run.loop(group, opt, hooks, settings)
    run.finish(rows)                           # end the trackers; the summary table

Seeding, moving frozen models and the accelerate reset between in-process runs live here too,
for the trainers and the tools that run them.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.logs import ProgressLogger, format_seconds, format_summary


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def to_device(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a model; cast only when the dtype changes (diffusers warns on every same-dtype cast)."""
    current = next(module.parameters(), None)
    if current is not None and current.dtype != dtype:
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def frozen_vae_dtype(args, device, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE runs in fp32 on the CPU (half-precision convolutions are slow there) and with --no_half_vae."""
    return torch.float32 if (args.no_half_vae or device.type == "cpu") else weight_dtype


def save_dtype(args) -> torch.dtype | None:
    """--save_precision as a dtype (None: as trained)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)


@dataclass
class Optimization:
    optimizer: object
    description: str       # for the ss_optimizer metadata
    lr_scheduler: object
    max_train_steps: int
    num_epochs: int
    network: object = None  # the network as prepared (wrapped under DeepSpeed)


@dataclass
class Run:
    """One training run's shared state; `begin` makes it, the methods below are the steps in order."""
    args: object
    main: bool                  # folders, files and messages belong to the main process
    fast: int                   # --fast_dev_run: a few steps, nothing written
    t_start: float
    accelerator: object = None
    weight_dtype: torch.dtype = torch.float32
    device: object = None
    tracker_dir: str | None = None
    caching: bool = False
    t_load: float = 0.0
    t_cache: float = 0.0
    t_loop: float = 0.0
    progress: ProgressLogger | None = None
    timings: dict = field(default_factory=dict)

    def print(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    def start(self, tracker_dir, group, overfit_batches: int = 0, describe=None):
        """Seeds, the Accelerator (with trackers when `tracker_dir`), and the training group split
        over the processes (each trains on its share of every batch; --overfit_batches keeps the
        first N); returns that group, described by `describe(group)` (default its summary())."""
        from library.training.accel import make_accelerator
        from library.training.loop import prepare_group

        seed_everything(self.args.seed)
        self.tracker_dir = tracker_dir
        self.accelerator, self.weight_dtype = make_accelerator(self.args, tracker_dir)
        self.device = self.accelerator.device
        group = prepare_group(group, self.accelerator.num_processes, overfit_batches or 0)
        say = self.accelerator.print
        say(describe(group) if describe is not None else group.summary(), flush=True)
        if self.accelerator.num_processes > 1:
            say(f"{self.accelerator.num_processes} processes: each step trains on {self.accelerator.num_processes} "
                "x the batch size, each process on its share; the steps above count these shared batches.", flush=True)
        if overfit_batches:
            say(f"overfit_batches: every epoch trains on the same first {group.num_batches_per_epoch} batches.",
                flush=True)
        return group

    def load_model(self, dtype: torch.dtype | None = None):
        """The SD model (the weights decide SD1/SD2; args.v2 follows), all of it frozen. `dtype`:
        the UNet's and text encoder's as loaded (default the run's weight dtype). Returns
        (model, the VAE's dtype)."""
        from library.models.loading import load_sd_model

        args = self.args
        t0 = time.perf_counter()
        vae_dtype = frozen_vae_dtype(args, self.device, self.weight_dtype)
        model = load_sd_model(args.pretrained_model_name_or_path, vae_path=args.vae, v2=args.v2,
                              v_parameterization=args.v_parameterization,
                              dtype=self.weight_dtype if dtype is None else dtype, vae_dtype=vae_dtype)
        args.v2 = model.v2  # the weights decide (a wrong --v2 was warned about); the metadata follows
        self.t_load = time.perf_counter() - t0
        for module in (model.text_encoder, model.vae, model.unet):
            module.requires_grad_(False)
        return model, vae_dtype

    def cache_latents(self, groups, vae, vae_dtype: torch.dtype, offload_vae: bool = True) -> None:
        """With --cache_latents(_to_disk): encode every image once, the main process first (with a
        disk cache it writes the files; the others then read them). The VAE goes to the device, and
        back to the CPU afterwards with `offload_vae` (every batch then carries latents)."""
        args, device = self.args, self.device
        t0 = time.perf_counter()
        to_device(vae, device, vae_dtype)
        if self.caching:
            with torch.no_grad(), self.accelerator.main_process_first():
                for group in groups:
                    if group is not None:
                        group.cache_latents(vae, to_disk=args.cache_latents_to_disk,
                                            vae_batch_size=args.vae_batch_size, device=device, dtype=vae_dtype,
                                            progress=self.accelerator.is_local_main_process)
            if offload_vae:
                vae.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        self.t_cache = time.perf_counter() - t0

    def optimization(self, params, num_batches_per_epoch: int, network=None) -> Optimization:
        """Optimizer and lr schedule over `params`, prepared by accelerate. The trainable modules
        stay unwrapped (the loop averages their gradients over the processes), except `network`
        under DeepSpeed, which must own it."""
        from accelerate.utils import DistributedType

        from library.training.loop import steps_and_epochs
        from library.training.optim import build_optimizer, build_scheduler

        args, accelerator = self.args, self.accelerator
        optimizer, description = build_optimizer(args, params, self.device.type)
        max_train_steps, num_epochs = steps_and_epochs(num_batches_per_epoch, args.gradient_accumulation_steps,
                                                       args.max_train_steps, args.max_train_epochs)
        lr_scheduler = build_scheduler(args, optimizer, max_train_steps)
        if network is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
            if args.train_batch_size and accelerator.state.deepspeed_plugin is not None:
                accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                    args.train_batch_size
            network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
        else:
            optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        return Optimization(optimizer, description, lr_scheduler, max_train_steps, num_epochs, network)

    def noise_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.args.seed)

    def start_trackers(self, name: str) -> None:
        """The one way trainers start their trackers (accel.init_trackers): --log_config,
        --wandb_run_name and --log_tracker_config take effect for every trainer."""
        from library.training.accel import init_trackers

        init_trackers(self.accelerator, self.args, name)

    def loop(self, group, opt: Optimization, hooks, settings, noise_generator, resume_latest: bool = False):
        """The shared loop (library.training.loop); a Ctrl+C saves and exits there."""
        from library.training.loop import run_training_or_exit

        self.progress = ProgressLogger(self.accelerator)
        self.t_loop = time.perf_counter()
        return run_training_or_exit(self.accelerator, group, opt.optimizer, opt.lr_scheduler, hooks, settings,
                                    noise_generator, self.progress, resume_latest=resume_latest)

    def common_rows(self, state=None, steps_only: bool = False) -> list[tuple]:
        """The summary rows every trainer prints: steps (and epochs), loss, load/cache and loop times."""
        rows = []
        if state is not None:
            epochs = state.epoch + (1 if state.next_batch else 0)
            rows.append(("steps", state.global_step) if steps_only
                        else ("steps / epochs", f"{state.global_step} / {epochs}"))
        rows += [("average loss (last 100 steps)", f"{self.progress.average_loss:.4f}"),
                 ("model load / latent caching", f"{format_seconds(self.t_load)} / {format_seconds(self.t_cache)}"),
                 ("training time", format_seconds(time.perf_counter() - self.t_loop))]
        return rows

    def finish(self, rows: list[tuple] | None = None) -> None:
        """End the trackers (after the trainer's last logs) and print the summary table."""
        self.accelerator.end_training()
        if rows is not None:
            self.print_summary(rows)

    def print_summary(self, rows: list[tuple]) -> None:
        self.accelerator.print(format_summary("training finished", rows))


def begin(args) -> Run:
    """The run's first step, before any folder or dataset: a seed common to all processes."""
    from library.training.accel import common_seed, is_main_process

    t_start = time.perf_counter()
    args.seed = common_seed(args.seed)  # with several processes: the same on all of them
    return Run(args=args, main=is_main_process(), fast=getattr(args, "fast_dev_run", 0) or 0, t_start=t_start,
               caching=bool(args.cache_latents or args.cache_latents_to_disk))


def loop_settings(args, opt: Optimization, output_dir, caching: bool, **overrides):
    """LoopSettings from the flags every trainer shares; `overrides` for what a trainer does its own way."""
    from library.training.loop import LoopSettings, automation_settings

    fields = dict(
        max_train_steps=opt.max_train_steps, num_epochs=opt.num_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        output_dir=Path(output_dir), output_name=args.output_name, seed=args.seed,
        save_every_n_epochs=args.save_every_n_epochs, save_every_n_steps=args.save_every_n_steps,
        save_last_n_epochs=args.save_last_n_epochs, save_last_n_steps=args.save_last_n_steps,
        save_state=args.save_state, save_state_on_train_end=args.save_state_on_train_end, resume=args.resume,
        num_workers=0 if caching else min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        persistent_workers=args.persistent_data_loader_workers, log_every_n_steps=args.log_every_n_steps,
        **automation_settings(args))
    fields.update(overrides)
    return LoopSettings(**fields)

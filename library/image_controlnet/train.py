"""The run: data -> model (backbone weights, freezing) -> optimizer/schedule -> resume -> epochs ->
checkpoints, TensorBoard, curve PNGs, summary.

Resume: a checkpoint whose trainable parts (--freeze_generator / --freeze_backbone) match the run
continues exactly (weights, optimizer, scheduler, scaler, epoch, step, best loss, history, RNG). If
they differ, it is the two-stage recipe (stage 1 frozen generator, stage 2 everything): the
weights are loaded and a new stage starts at epoch 0 with a fresh optimizer, and the run says so.

Several processes (`accelerate launch --num_processes N`, torchrun): every process builds the same
model (the main process's weights are broadcast), trains on its share of each global batch of
--batch_size x N samples and averages the gradients (library.image_controlnet.steps), so all stay
identical; metrics are summed over the processes. Files, TensorBoard, curves and messages belong to
the main process.

Trainer automation under Lightning's names, as the loop-based trainers have it: --save_top_k keeps
the k best checkpoints by --monitor (library.training.checkpoint.TopKSaver ranks, deletes and lists
them), --fast_dev_run trains and validates a few batches and writes nothing, --overfit_batches
repeats the first batches, --profile traces steps 3-7 (library.training.loop.Profiler),
--log_every_n_steps / --log_images_every_n_steps log per optimizer step.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.fileio import check_writable_dir
from library.image_controlnet import steps as S
from library.image_controlnet.checkpoint import read_checkpoint, save_checkpoint
from library.image_controlnet.data import load_pairs
from library.image_controlnet.dataset import PairDataset
from library.image_controlnet.model import ImageControlNet, ModelConfig, num_generator_stages
from library.logs import format_seconds, format_summary, warn_once
from library.training.checkpoint import TopKSaver, _rng_states, _set_rng_states
from library.training.optim import fast_adamw_kwargs

ARCH_FLAGS = ("backbone", "image_size", "feature_dim", "pose_dim", "num_control_layers")
STRIDES = {"small": 8, "iresnet50": 16, "iresnet100": 16, "resnet50": 32}


def model_config(args, defaults: dict, ckpt: dict | None) -> ModelConfig:
    """The architecture: from the flags, or from the checkpoint for flags left at their defaults."""
    values = {k: getattr(args, k) for k in ARCH_FLAGS}
    if ckpt is not None:
        clash = [f"--{k} {values[k]} (checkpoint: {ckpt['config'][k]})" for k in ARCH_FLAGS
                 if values[k] != ckpt["config"][k] and values[k] != defaults.get(k)]
        if clash:
            raise UserError(f"the --resume checkpoint was trained with a different model: {'; '.join(clash)}.",
                            path=args.resume, fix="drop those flags (the checkpoint's values are used) or "
                                                  "start a new run without --resume.")
        values = {k: ckpt["config"][k] for k in ARCH_FLAGS}
        taken = [f"--{k} {values[k]}" for k in ARCH_FLAGS if values[k] != getattr(args, k)]
        if taken:
            print(f"model settings from the checkpoint: {' '.join(taken)}", flush=True)
    stages = num_generator_stages(STRIDES[values["backbone"]])
    if values["num_control_layers"] > stages:
        raise UserError(f"--num_control_layers {values['num_control_layers']} is more than the {stages} generator "
                        f"stages of --backbone {values['backbone']}.", fix=f"use --num_control_layers 1 to {stages}.")
    if values["image_size"] % STRIDES[values["backbone"]] and values["backbone"] != "resnet50":
        raise UserError(f"--image_size {values['image_size']} is not a multiple of {STRIDES[values['backbone']]}, "
                        f"the downsampling of --backbone {values['backbone']}.",
                        fix=f"use an --image_size divisible by {STRIDES[values['backbone']]}, e.g. 112.")
    return ModelConfig(**values)


def set_trainable(model: ImageControlNet, freeze_generator: bool, freeze_backbone: bool) -> list:
    for p in model.parameters():
        p.requires_grad_(True)
    if freeze_generator:
        model.generator.requires_grad_(False)
    if freeze_backbone:
        model.encoder.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def cosine_schedule(optimizer, total_steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_model(args, config, ckpt):
    model = ImageControlNet(config)
    notes = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif args.backbone_weights:
        from library.image_controlnet.backbones import load_backbone_weights

        notes += load_backbone_weights(model.encoder, args.backbone_weights, config.backbone)
    elif config.backbone != "small":
        warn_once(f"NO PRETRAINED WEIGHTS: --backbone {config.backbone} starts from random weights. Face "
                  "features then have to be learned from your data alone, which needs far more data and "
                  "epochs. Pass a local file with --backbone_weights (InsightFace arcface iresnet .pth, "
                  "or torchvision's ImageNet resnet50 state dict).")
    freeze_backbone = args.freeze_backbone if args.freeze_backbone is not None else bool(args.backbone_weights)
    return model, freeze_backbone, notes


def _fast_dev_run(model, train_ds, val_ds, optimizer, scheduler, scaler, args, device, params, procs,
                  start_epoch: int, amp, say) -> dict:
    """--fast_dev_run N: N optimizer steps, then N batches of validation; nothing is written."""
    taken, epoch = 0, start_epoch
    while taken < args.fast_dev_run:
        _, k = S.train_epoch(model, train_ds, optimizer, scheduler, scaler, epoch=epoch, args=args, device=device,
                             params=params, procs=procs, amp=amp, overfit_batches=args.overfit_batches or 0,
                             max_steps=args.fast_dev_run - taken)
        if k == 0:
            break
        taken, epoch = taken + k, epoch + 1
    metrics = S.evaluate(model, val_ds, args=args, device=device, procs=procs, amp=amp,
                         max_batches=args.fast_dev_run) if len(val_ds) else {}
    if metrics:
        say("fast_dev_run: validation " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()), flush=True)
    say(f"fast_dev_run: {taken} training steps ran; nothing was saved.", flush=True)
    return {"fast_dev_run": taken, **metrics}


def train(args, defaults: dict | None = None) -> dict:
    """Run training from parsed arguments; returns the summary numbers (also printed)."""
    from library.training.accel import broadcast_parameters, process_state

    started = time.perf_counter()
    procs = process_state()  # one process without a launcher
    main, world = procs.is_main_process, procs.num_processes
    ckpt = read_checkpoint(args.resume) if args.resume else None
    config = model_config(args, defaults or {}, ckpt)
    seed_everything(args.seed)
    report = load_pairs(args.data_dir, args.image_dir, val_fraction=args.val_fraction, seed=args.seed)
    fast = args.fast_dev_run  # a few steps and batches of validation; nothing is written anywhere
    writes = main and not fast
    save_dir = check_writable_dir(args.save_dir, "--save_dir") if writes else Path(args.save_dir)
    log_dir = check_writable_dir(args.log_dir, "--log_dir") if writes else Path(args.log_dir)
    device = procs.device if world > 1 else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = S.amp_dtype(args, device, warn_once if main else None)

    model, freeze_backbone, notes = _prepare_model(args, config, ckpt)
    trainable = {"freeze_generator": bool(args.freeze_generator), "freeze_backbone": bool(freeze_backbone)}
    params = set_trainable(model, args.freeze_generator, freeze_backbone)
    model.to(device)
    broadcast_parameters(procs, model)  # identical start on every process
    train_pairs = [p for p in report.pairs if p.split == "train"]
    val_pairs = [p for p in report.pairs if p.split == "val"]
    if not val_pairs and main:
        warn_once("no validation pairs (all identities are in training): best_model.pth is chosen by the "
                  "training loss. Set --val_fraction or give items \"split\": \"val\".")
    train_ds = PairDataset(train_pairs, config.image_size, config.pose_dim)
    val_ds = PairDataset(val_pairs, config.image_size, config.pose_dim)
    monitor = args.monitor or ("val_loss" if len(val_ds) else "train_loss")  # what best_model.pth goes by
    if args.save_top_k:
        from library.image_controlnet.tblog import SCALARS

        known = [k for k in SCALARS if len(val_ds) or not k.startswith("val_")]
        if monitor not in known:
            raise UserError(f"--monitor {monitor} is not a metric of this run"
                            + ("" if len(val_ds) else " (it has no validation pairs)") + ".",
                            fix=f"use one of: {', '.join(known)}.")

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                  **fast_adamw_kwargs(device.type))
    steps_per_epoch = len(S.group_sizes(len(train_ds), args.batch_size * world, args.gradient_accumulation_steps,
                                        args.overfit_batches))
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch, args.lr_warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, global_step, best, history, top_k_entries = 0, 0, math.inf, {}, None
    if ckpt is not None and ckpt["trainable"] == trainable:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without fp16 AMP (e.g. on a CPU); a new scale is fine then
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step, best = ckpt["epoch"], ckpt["global_step"], ckpt["best_val_loss"]
        history = {k: list(v) for k, v in ckpt["history"].items()}
        top_k_entries = ckpt.get("top_k")  # --save_top_k goes on with the same list
        _set_rng_states(ckpt["rng"], None)
        notes.append(f"resumed from {args.resume} after epoch {start_epoch} (step {global_step})")
    elif ckpt is not None:
        notes.append(f"new training stage from the weights of {args.resume}: its frozen parts {ckpt['trainable']} "
                     f"differ from this run's {trainable}, so the optimizer and the epoch count start fresh")
    say = print if main else (lambda *a, **k: None)
    for note in notes:
        say(note, flush=True)
    say(f"{report.notes[0]}; {sum(p.numel() for p in params):,} trainable of "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; device {device}"
        + (f"; {world} processes, {args.batch_size * world} samples per batch" if world > 1 else ""), flush=True)
    if args.overfit_batches:
        n_batches = min(args.overfit_batches, -(-len(train_ds) // (args.batch_size * world)))
        say(f"overfit_batches: every epoch trains on the same first {n_batches} batches.", flush=True)
    if fast:
        return _fast_dev_run(model, train_ds, val_ds, optimizer, scheduler, scaler, args, device, params, procs,
                             start_epoch, amp, say)
    if start_epoch >= args.epochs:
        say(f"nothing to train: the checkpoint already has {start_epoch} epochs (--epochs {args.epochs}).")
        return {"epochs": start_epoch}

    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from library.image_controlnet import tblog
    from library.training.accel import any_process
    from library.training.loop import DivergenceGuard, Profiler

    writer = SummaryWriter(str(log_dir)) if main else None
    if main:
        tblog.log_pose_histograms(writer, train_pairs, start_epoch)
    shown = list(range(0, len(val_ds), max(1, len(val_ds) // 8)))[:8] if len(val_ds) else []
    run_args = {k: v for k, v in vars(args).items()}
    total_steps = args.epochs * steps_per_epoch
    profiler = Profiler(save_dir, procs) if args.profile and main else None
    if profiler is not None and total_steps - start_epoch * steps_per_epoch < Profiler.LAST:
        warn_once(f"--profile traces optimizer steps {Profiler.FIRST}-{Profiler.LAST}, but this run has only "
                  f"{total_steps - start_epoch * steps_per_epoch}; no profile will be written.")
    top_k = None
    if args.save_top_k and main:
        def save_top(epoch_done, step):  # `state`: the epoch's, set just before top_k.offer
            return save_checkpoint(save_dir / f"top_epoch_{epoch_done}.pth", best_val_loss=best, rng=_rng_states(None),
                                   top_k=top_k.entries, **state)

        top_k = TopKSaver(args.save_top_k, monitor, args.monitor_mode, save_top, save_dir / "top_k.json",
                          top_k_entries)
    every_images = args.log_images_every_n_steps  # steps; otherwise --image_log_interval epochs
    guard = DivergenceGuard(args.divergence_patience, scaler.is_enabled(), lambda flag: any_process(procs, flag))

    def on_step(taken: int, loss) -> None:
        step = global_step + taken  # global_step: the steps before this epoch
        if profiler is not None:
            profiler.step(step)
        if writer is None:
            return
        if step % args.log_every_n_steps == 0:
            writer.add_scalar("Step/TrainLoss", loss(), step)
            writer.add_scalar("Step/LR", scheduler.get_last_lr()[0], step)
        if every_images and shown and step % every_images == 0:
            tblog.log_images(writer, *S.generate(model, val_ds, shown, device=device, amp=amp), step)
            model.train()  # generate switched it to eval mode mid-epoch

    progress = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc="steps",
                    dynamic_ncols=True, disable=not main)
    metrics = {}
    from library.training.output_lock import OutputDirLock

    lock = OutputDirLock(save_dir, "checkpoint") if main else None  # one run per --save_dir
    try:
        if lock is not None:
            lock.acquire()
        for epoch in range(start_epoch, args.epochs):
            metrics, taken = S.train_epoch(model, train_ds, optimizer, scheduler, scaler, epoch=epoch, args=args,
                                           device=device, params=params, progress=progress, procs=procs, amp=amp,
                                           overfit_batches=args.overfit_batches or 0, on_step=on_step,
                                           guard=guard, first_step=global_step + 1)
            global_step += taken
            metrics["lr"] = scheduler.get_last_lr()[0]
            if len(val_ds):
                metrics.update(S.evaluate(model, val_ds, args=args, device=device, procs=procs, amp=amp))
            done = epoch + 1
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
            # the metrics are the same on every process, so every process decides alike
            score = metrics.get("val_loss", metrics["train_loss"])
            improved = score < best
            best = min(best, score)
            if not main:
                continue
            tblog.log_epoch(writer, metrics, done)
            if not guard.healthy:  # inside a streak of skipped NaN steps: no save replaces a good file
                continue
            guard.check_weights(model, global_step)
            if shown and not every_images and (done % args.image_log_interval == 0 or done == args.epochs
                                               or epoch == start_epoch):
                tblog.log_images(writer, *S.generate(model, val_ds, shown, device=device, amp=amp), done)
            writer.flush()
            state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=done,
                         global_step=global_step, history=history, trainable=trainable, args=run_args)
            if top_k is not None:
                top_k.offer(metrics, done, global_step)
            entries = dict(top_k=top_k.entries) if top_k is not None else {}
            if improved:
                save_checkpoint(save_dir / "best_model.pth", best_val_loss=best, rng=_rng_states(None), **entries,
                                **state)
            if done % args.save_interval == 0 or done == args.epochs:
                path = save_checkpoint(save_dir / f"checkpoint_epoch_{done}.pth", best_val_loss=best,
                                       rng=_rng_states(None), **entries, **state)
                guard.saved("model", path)
                guard.saved("state", path)
                tblog.save_curves(history, save_dir / f"training_curves_epoch_{done}.png", f"epoch {done}")
            progress.write(f"epoch {done}/{args.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k != "lr"))
    finally:
        if lock is not None:
            lock.release()
        progress.close()
        if writer is not None:
            writer.close()
    if not guard.healthy:
        raise guard.error(f"the last {guard.bad_in_a_row} optimizer steps (from step {guard.first_bad_step}) had a "
                          "NaN or Inf loss or gradient norm and were skipped")
    summary = {"epochs": args.epochs, "best_val_loss": best, **metrics}
    if not main:
        return summary
    tblog.save_curves(history, save_dir / "final_training_curves.png", f"final ({args.epochs} epochs)")
    rows = [("epochs", args.epochs), ("optimizer steps", global_step), ("best loss", f"{best:.5f}")]
    if "val_psnr" in metrics:
        rows.append(("val PSNR", f"{metrics['val_psnr']:.2f} dB (copying the source: "
                                  f"{metrics['val_copy_psnr']:.2f} dB)"))
        rows.append(("pose head error", f"{metrics['val_pose_error_deg']:.2f} deg (mean over angles)"))
    if top_k is not None:  # --monitor was checked before training: every epoch offered it
        rows.append((f"top {args.save_top_k} by {monitor}", ", ".join(
            f"{e['file']} ({e['value']:.5g})" for e in top_k.entries) + f"  (listed in {top_k.index_path})"))
    rows += [("checkpoints", str(save_dir)), ("TensorBoard", f"tensorboard --logdir {log_dir}"),
             ("time", format_seconds(time.perf_counter() - started))]
    print(format_summary("ImageControlNet training finished", rows), flush=True)
    return summary

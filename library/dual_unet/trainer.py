"""The body of train_dual_unet.py, built from the same steps as train_network.

The steps of library/training/run.py, as for every trainer: checks and pair preflight (seconds) ->
load the base -> latent caching -> two UNets (the second a weight-sharing twin) with one LoRA
each -> optimizer and schedule over both LoRAs -> the shared loop (library.training.loop) ->
final checkpoint and summary. What differs: a batch is a pair, the objective is
library/dual_unet/step.py's, and every --validate_every steps a validation loss decides the best
checkpoint, while rolling checkpoints and sample pairs are written on their own schedules.
The loop's automation works as for train_network: --save_top_k keeps whole checkpoint folders,
--fast_dev_run writes nothing (not even the run folder), --overfit_batches repeats the first batches.
"""
from __future__ import annotations

import argparse
import functools
import re
import time
from pathlib import Path

import torch

from library.dual_unet import data, model as model_mod, outputs, step as step_mod
from library.dual_unet.hooks import DualHooks
from library.errors import UserError
from library.fileio import check_writable_dir
from library.training import diffusion
from library.training.checkpoint import save_train_state
from library.training.loop import LoopHooks
from library.training.run import begin, loop_settings, save_dtype, to_device

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_arguments(args) -> None:
    for flag, value in (("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                        ("--output_dir", args.output_dir)):
        if not value:
            raise UserError(f"{flag} is missing.", fix=f"pass {flag} (see train_dual_unet.py --help).")
    mods = tuple(args.modalities)
    if len(mods) != 2 or mods[0].lower() == mods[1].lower() or not all(_NAME.match(m) for m in mods):
        raise UserError(f"--modalities needs two different names of letters, digits, _ or - (got {' '.join(mods)}).",
                        fix="pass e.g. --modalities cf fa; they name the data folders and the LoRA files.")
    if args.max_steps:  # the original CF/FA scripts' name for --max_train_steps
        args.max_train_steps = args.max_steps
    if args.offset_noise_strength is not None:  # the original CF/FA scripts' name for --noise_offset
        if args.noise_offset is not None and args.noise_offset != args.offset_noise_strength:
            raise UserError("--offset_noise_strength and --noise_offset are the same setting with two values.",
                            fix="pass only one of them.")
        args.noise_offset = args.offset_noise_strength or None
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a multiple of 8, which the VAE needs.",
                        fix="pass e.g. --resolution 512.")
    diffusion.check_loss_arguments(args)
    from library.training.optim import optimizer_name

    optimizer_name(args)


def _lora_metadata(args, modality: str, partner: str, n_pairs: int, optimizer_desc: str, max_steps: int,
                   num_epochs: int, batches: int, mixed_precision: str) -> dict:
    """kohya's ss_* metadata for one modality's LoRA file, so WebUI and kohya tools describe it."""
    import json

    from library.training import metadata as meta_mod

    ns = argparse.Namespace(**{**vars(args), "network_module": "networks.lora", "network_dim": args.unet_lora_rank,
                               "network_alpha": args.unet_lora_alpha, "text_encoder_lr": None,
                               "unet_lr": args.learning_rate, "prior_loss_weight": 1.0,
                               "resolution": (args.resolution, args.resolution),
                               "output_name": f"{args.name or 'dual_unet'}_{modality}"})
    meta = meta_mod.training_metadata(ns, group_meta={"ss_num_train_images": str(n_pairs)},
                                      optimizer_desc=optimizer_desc, max_train_steps=max_steps, num_epochs=num_epochs,
                                      num_batches_per_epoch=batches, network_args={}, mixed_precision=mixed_precision)
    meta["ss_training_comment"] = json.dumps({"dual_unet": {"modality": modality, "partner": partner,
                                                            "hf_lambda": args.hf_lambda,
                                                            "struct_lambda": args.struct_lambda,
                                                            "struct_loss": args.struct_loss}})
    return meta


def checkpoint_info(args, dual) -> dict:
    """dual_unet.json: what a checkpoint was trained from and with."""
    return {"format": "dual_unet/1", "modalities": list(dual.modalities), "prompts": list(dual.prompts),
            "base_model": str(args.pretrained_model_name_or_path), "vae": args.vae, "v2": bool(args.v2),
            "v_parameterization": bool(args.v_parameterization), "clip_skip": args.clip_skip,
            "resolution": args.resolution, "unet_lora_rank": args.unet_lora_rank,
            "unet_lora_alpha": args.unet_lora_alpha, "hf_lambda": args.hf_lambda,
            "struct_lambda": args.struct_lambda, "struct_loss": args.struct_loss, "seed": args.seed}


def batch_latents(batch, vae, device, dtype, vae_dtype) -> list:
    """The pair's two latents: cached, else encoded as the latent cache encodes them."""
    from library.data import encode_latents

    out = []
    for side in (0, 1):
        if batch.get(f"latents_{side}") is not None:
            out.append(batch[f"latents_{side}"].to(device, dtype=dtype))
        else:
            out.append(encode_latents(vae, batch[f"images_{side}"].to(device, dtype=vae_dtype)).to(dtype))
    return out


def train(args) -> dict:
    check_arguments(args)
    run = begin(args)
    args.unet_lora_alpha = args.unet_lora_alpha or float(args.unet_lora_rank)  # the original CF/FA scripts' alpha = rank
    fast = run.fast  # a few steps and one validation; nothing is written anywhere
    writes = run.main and not fast
    output_dir = check_writable_dir(args.output_dir, "--output_dir") if writes else Path(args.output_dir)
    run_folder = outputs.RunFolder(output_dir, args.name, create=writes)
    resume = outputs.resolve_resume(args.resume, run_folder)
    train_group, val_group = data.build_datasets(args)  # every file checked before a model loads
    if fast and args.cache_latents_to_disk:
        args.cache_latents, args.cache_latents_to_disk = True, False  # in memory: no files beside the images

    train_group = run.start(None if fast else str(run_folder.logs), train_group, args.overfit_batches or 0,
                            describe=lambda group: group.summary(val_group))
    accelerator, device, weight_dtype = run.accelerator, run.device, run.weight_dtype
    if fast:
        accelerator.print(f"fast_dev_run: {fast} training steps and at most {fast} validation batches; nothing is "
                          "saved (no run folder, checkpoints, logs, samples or latent files).", flush=True)
    model, vae_dtype = run.load_model()
    run.cache_latents([train_group, val_group], model.vae, vae_dtype, offload_vae=False)  # samples decode with it

    # The base UNet goes to its device and dtype *before* it is twinned (see model.py).
    to_device(model.unet, device, weight_dtype)
    to_device(model.text_encoder, device, weight_dtype)
    from library.args import parse_kv_list

    make = model_mod.new_networks(args.unet_lora_rank, args.unet_lora_alpha, args.network_dropout,
                                  parse_kv_list(args.network_args, "--network_args"))
    dual = model_mod.attach(model, args.modalities, make, tuple(args.prompts or ("", "")), device, args.clip_skip)
    if args.gradient_checkpointing:
        for unet in dual.unets:
            unet.enable_gradient_checkpointing()
    params = []
    for network, modality in zip(dual.networks, dual.modalities):
        network.to(device, torch.float32)
        for group in network.prepare_optimizer_params(None, args.learning_rate, args.learning_rate):
            params.append({**group, "name": f"{group.get('name', 'unet')}_{modality}"})
    lr_names = [g["name"] for g in params]

    opt = run.optimization(params, train_group.num_batches_per_epoch)
    optimizer, max_train_steps = opt.optimizer, opt.max_train_steps
    trainable = dual.trainable()
    params_to_clip = [p for g in params for p in g["params"]]
    objective = diffusion.DiffusionObjective(args, model.noise_scheduler, device)
    noise_generator = run.noise_generator()
    weights = dict(hf_lambda=args.hf_lambda, struct_lambda=args.struct_lambda, struct_kind=args.struct_loss)

    latents_of = functools.partial(batch_latents, vae=model.vae, device=device, dtype=weight_dtype,
                                   vae_dtype=vae_dtype)
    dual_hooks = DualHooks(args, accelerator, model, dual, val_group, run_folder, resume, latents_of, weights,
                           max_train_steps, writes, fast, weight_dtype)

    def compute_loss(batch):
        terms = step_mod.paired_losses(dual, objective, latents_of(batch), noise_generator, **weights)
        dual_hooks.records.append(terms)
        return terms["loss"]

    scaler = getattr(accelerator, "scaler", None)
    mods = dual.modalities
    metas = [_lora_metadata(args, m, p, len(train_group.pairs), opt.description, max_train_steps, opt.num_epochs,
                            train_group.num_batches_per_epoch, accelerator.mixed_precision)
             for m, p in ((mods[0], mods[1]), (mods[1], mods[0]))]
    dual_hooks.optimizer = optimizer
    dual_hooks.writer = outputs.CheckpointWriter(
        run_folder, dual, checkpoint_info(args, dual), metas, save_dtype(args), args.save_model_as, args.keep_last,
        lambda path: save_train_state(path, dual_hooks.state, trainable, optimizer, opt.lr_scheduler, noise_generator,
                                      scaler),
        accelerator.print)

    # Without periodic validation the loop must not validate at epoch ends either: no hook then
    # (fast_dev_run still validates its few batches once).
    periodic = val_group is not None and bool(args.validate_every or fast)
    monitor = args.monitor or ("val/loss" if periodic else "loss/epoch")
    settings = loop_settings(
        args, opt, run_folder.root, caching=False, output_name="dual_unet", resume=resume, monitor=monitor,
        num_workers=min(args.max_data_loader_n_workers, 8), validate_every_n_steps=args.validate_every or None,
        # the original CF/FA scripts' own checkpoints (--keep_last, best): kohya's epoch saves, last-n and state folders do not apply
        save_every_n_epochs=None, save_last_n_epochs=None, save_last_n_steps=None, save_state=False,
        save_state_on_train_end=False)
    hooks = LoopHooks(compute_loss=compute_loss, save_model=dual_hooks.save_model, trainable=trainable,
                      params_to_clip=params_to_clip, lr_names=lr_names, after_step=dual_hooks.after_step,
                      sample=dual_hooks.sample, want_sample=dual_hooks.want_sample, on_state=dual_hooks.on_state,
                      validate=dual_hooks.validate_now if periodic else None)
    run.start_trackers((args.log_prefix or "") + (args.log_tracker_name or "dual_unet") + time.strftime("%Y%m%d%H%M%S"))
    state = run.loop(train_group, opt, hooks, settings, noise_generator, resume_latest=True)
    run.finish()
    result = {"run": run_folder, "state": state, "dual": dual, "model": model,
              "total_s": time.perf_counter() - run.t_start, "step_end_times": run.progress.step_end_times}
    if fast:  # the loop has said what ran; there are no files to list
        return result
    book = state.extra["dual_unet"]
    rows = [("run folder", run_folder.root), ("LoRA files", ", ".join(f"{m}.{args.save_model_as}" for m in mods)),
            ("latest checkpoint", run_folder.checkpoint(state.global_step)),
            ("best checkpoint", f"{run_folder.best} (step {book['best_step']}, val loss {book['best_val']:.5f})"
             if book["best_val"] is not None else "- (no validation pairs)"),
            *([("top-k checkpoints", ", ".join(f"{e['file']} ({settings.monitor} {e['value']:.5f})"
                                                for e in state.extra["top_k"]))] if state.extra.get("top_k") else []),
            *run.common_rows(state, steps_only=True),
            ("TensorBoard logs", f"{run_folder.logs}  (tensorboard --logdir \"{run_folder.logs}\")")]
    run.print_summary(rows)
    return result

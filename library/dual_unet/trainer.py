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
import random
import re
import time
from pathlib import Path

import torch

from library.dual_unet import data, model as model_mod, outputs, step as step_mod
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
    if args.max_steps:  # the seed's name for --max_train_steps
        args.max_train_steps = args.max_steps
    if args.offset_noise_strength is not None:  # the seed's name for --noise_offset
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


def train(args) -> dict:
    check_arguments(args)
    run = begin(args)
    args.unet_lora_alpha = args.unet_lora_alpha or float(args.unet_lora_rank)  # the seed's alpha = rank
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

    def latents_of(batch):
        out = []
        for side in (0, 1):
            if batch.get(f"latents_{side}") is not None:
                out.append(batch[f"latents_{side}"].to(device, dtype=weight_dtype))
            else:
                from library.data import encode_latents

                out.append(encode_latents(model.vae, batch[f"images_{side}"].to(device, dtype=vae_dtype)).to(weight_dtype))
        return out

    records: list[dict] = []

    def compute_loss(batch):
        terms = step_mod.paired_losses(dual, objective, latents_of(batch), noise_generator, **weights)
        records.append(terms)
        return terms["loss"]

    live = {}  # the loop's TrainState (hooks.on_state), read when a checkpoint is written
    scaler = getattr(accelerator, "scaler", None)
    mods = dual.modalities
    info = {"format": "dual_unet/1", "modalities": list(mods), "prompts": list(dual.prompts),
            "base_model": str(args.pretrained_model_name_or_path), "vae": args.vae, "v2": bool(args.v2),
            "v_parameterization": bool(args.v_parameterization), "clip_skip": args.clip_skip,
            "resolution": args.resolution, "unet_lora_rank": args.unet_lora_rank,
            "unet_lora_alpha": args.unet_lora_alpha, "hf_lambda": args.hf_lambda,
            "struct_lambda": args.struct_lambda, "struct_loss": args.struct_loss, "seed": args.seed}
    metas = [_lora_metadata(args, m, p, len(train_group.pairs), opt.description, max_train_steps, opt.num_epochs,
                            train_group.num_batches_per_epoch, accelerator.mixed_precision)
             for m, p in ((mods[0], mods[1]), (mods[1], mods[0]))]
    writer = outputs.CheckpointWriter(
        run_folder, dual, info, metas, save_dtype(args), args.save_model_as, args.keep_last,
        lambda path: save_train_state(path, live["state"], trainable, optimizer, opt.lr_scheduler, noise_generator,
                                      scaler),
        accelerator.print)
    resumed_from = None
    train_log = val_log = None

    def on_state(state):
        nonlocal train_log, val_log, resumed_from
        live["state"] = state
        state.extra.setdefault("dual_unet", {"best_val": None, "best_step": None, "saved_step": None,
                                             "validated_step": None})
        resumed_from = state.global_step if resume else None
        if writes:
            train_log = outputs.TextLog(run_folder.training_log, ["step", "epoch", *step_mod.TERMS, "lr"],
                                        resumed_from)
            val_log = outputs.TextLog(run_folder.validation_log,
                                      ["step", *[f"val_{k}" for k in step_mod.TERMS], "best"], resumed_from)
        if state.global_step == 0 and args.validate_every and not fast:  # the base alone (zero LoRAs): the baseline
            log_validation(0, 0)

    def validate(step_no: int, epoch: int) -> dict:
        book = live["state"].extra["dual_unet"]
        book["validated_step"] = step_no
        if val_group is None or not accelerator.is_main_process:
            return {}
        with accelerator.autocast():
            vals = step_mod.validation_losses(
                dual, val_group, lambda: diffusion.DiffusionObjective(args, model.noise_scheduler, device,
                                                                      rng=random.Random(step_mod.VALIDATION_SEED)),
                latents_of, device, max_batches=fast or None, **weights)
        if fast:
            return {f"val/{k}": v for k, v in vals.items()}
        improved = book["best_val"] is None or vals["loss"] < book["best_val"]
        if improved:
            book.update(best_val=vals["loss"], best_step=step_no)
        val_log.write({"step": step_no, **{f"val_{k}": v for k, v in vals.items()}, "best": int(improved)})
        if improved:
            writer.save_best(epoch, step_no, {"val_loss": vals["loss"]})
        return {f"val/{k}": v for k, v in vals.items()}

    def log_validation(step_no: int, epoch: int) -> None:
        val_logs = validate(step_no, epoch)
        if accelerator.trackers and val_logs:
            accelerator.log(val_logs, step=step_no)

    def save_latest(step_no: int, epoch: int):
        book = live["state"].extra["dual_unet"]
        book["saved_step"] = step_no
        if accelerator.is_main_process:
            return writer.save_latest(epoch, step_no, {"best_val_loss": book["best_val"]})

    def after_step(step_no: int) -> dict:
        # Validation (hooks.validate) and the rolling checkpoints ("step" saves) follow on the loop's
        # schedule, in that order, so a checkpoint records the validation of its own step.
        logs = {}
        if step_no % args.log_every_n_steps == 0 or step_no == max_train_steps:
            terms = step_mod.mean_terms(records)
            records.clear()
            logs = {f"loss/{k}": v for k, v in terms.items()}
            if train_log is not None:
                train_log.write({"step": step_no, "epoch": live["state"].epoch + 1, **terms,
                                 "lr": optimizer.param_groups[0]["lr"]})
        return logs

    def validate_now() -> dict:
        state = live["state"]
        return validate(state.global_step, state.epoch)

    def save_model(kind, epoch, step_no):
        if kind == "top":  # --save_top_k: a whole checkpoint; the loop ranks, lists and deletes them
            folder = writer.write(run_folder.top_checkpoint(step_no), epoch, step_no,
                                  {"best_val_loss": live["state"].extra["dual_unet"]["best_val"]})
            accelerator.print(f"saved top-k checkpoint {folder}")
            return folder
        if kind == "step":
            return save_latest(step_no, epoch)
        book = live["state"].extra["dual_unet"]
        if book["validated_step"] != step_no:  # the final weights get a validation too
            log_validation(step_no, epoch)
        if book["saved_step"] != step_no:
            save_latest(step_no, epoch)
        return run_folder.checkpoint(step_no)

    from library.dual_unet.sampling import generate_pairs, grid, save_pairs

    def want_sample(epoch, step_no):
        if epoch is not None or not args.sample_every or not args.num_sample_pairs:
            return False
        return step_no % args.sample_every == 0 and (step_no > 0 or args.sample_at_first)

    def sample(epoch, step_no):
        if not accelerator.is_main_process:
            return
        seeds = [args.seed + i for i in range(args.num_sample_pairs)]  # the same noise at every sample step
        a, b = generate_pairs(model, dual, seeds, resolution=args.resolution, steps=args.sample_steps, device=device,
                              dtype=weight_dtype, sampler=args.sample_sampler)
        save_pairs(run_folder.samples(step_no), a, b, mods)
        tracker = accelerator.get_tracker("tensorboard", unwrap=False) if accelerator.trackers else None
        if tracker is not None:
            tracker.writer.add_image("samples/pairs", grid(a, b), step_no, dataformats="HWC")

    # Without periodic validation the loop must not validate at epoch ends either: no hook then
    # (fast_dev_run still validates its few batches once).
    periodic = val_group is not None and bool(args.validate_every or fast)
    monitor = args.monitor or ("val/loss" if periodic else "loss/epoch")
    settings = loop_settings(
        args, opt, run_folder.root, caching=False, output_name="dual_unet", resume=resume, monitor=monitor,
        num_workers=min(args.max_data_loader_n_workers, 8), validate_every_n_steps=args.validate_every or None,
        # the seed's own checkpoints (--keep_last, best): kohya's epoch saves, last-n and state folders do not apply
        save_every_n_epochs=None, save_last_n_epochs=None, save_last_n_steps=None, save_state=False,
        save_state_on_train_end=False)
    hooks = LoopHooks(compute_loss=compute_loss, save_model=save_model, trainable=trainable,
                      params_to_clip=params_to_clip, lr_names=lr_names, after_step=after_step,
                      sample=sample, want_sample=want_sample, on_state=on_state,
                      validate=validate_now if periodic else None)
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

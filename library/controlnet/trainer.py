"""One training stage of train_controlnet.py, built from the same steps as train_network.

    controlnet  the ControlNet trains; UNet, VAE and text encoder frozen
    unet_lora   only a UNet LoRA trains; the ControlNet (from --controlnet_path) is frozen too
    joint       ControlNet and UNet LoRA train together, each with its own learning rate

The steps of library/training/run.py, as for every trainer: checks and dataset preflight -> model ->
latent caching -> ControlNet / LoRA -> optimizer and schedule -> the shared loop (library.training.loop)
-> final files and summary. What differs: the ControlNet's residuals feed the UNet, batches carry
the condition, the loss may be heatmap-weighted, and every epoch can end with a validation loss,
early stopping and a best checkpoint (library.controlnet.outputs writes the files);
--log_images_every_n_steps logs grids of generated examples (library.controlnet.image_log).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from library.controlnet import data, evaluation, outputs, weighting
from library.controlnet.early_stopping import EarlyStopping
from library.controlnet.image_log import ImageLogger
from library.fileio import check_writable_dir
from library.logs import warn_once
from library.models import families
from library.training import diffusion
from library.training.loop import LoopHooks
from library.training.run import begin, loop_settings, to_device


def _fingerprint(module) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stage_modules(args, stage: str, model, device, weight_dtype):
    """The stage's ControlNet (new from the UNet, or loaded; frozen in unet_lora) and UNet LoRA (or None)."""
    from library.controlnet.model import create_controlnet, load_controlnet

    trains_cn = stage in ("controlnet", "joint")
    source = args.controlnet_path if stage == "unet_lora" else args.controlnet_model_name_or_path
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    controlnet = load_controlnet(source, unet, vae) if source else create_controlnet(unet, vae)
    controlnet.requires_grad_(trains_cn)
    to_device(controlnet, device, torch.float32 if trains_cn else weight_dtype)
    if not trains_cn:
        controlnet.eval()
    network = None
    if stage in ("unet_lora", "joint"):
        from networks.lora import create_network

        network = create_network(1.0, args.lora_rank, args.lora_alpha or args.lora_rank, vae, text_encoder, unet)
        network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
        network.to(device, torch.float32)
    return controlnet, network


def stage_params(args, controlnet, network) -> list[dict]:
    """Optimizer groups: the ControlNet at --learning_rate, the LoRA at --lora_learning_rate."""
    params = []
    if controlnet is not None:
        params.append({"params": [p for p in controlnet.parameters()], "lr": args.learning_rate, "name": "controlnet"})
    if network is not None:
        lora_lr = args.lora_learning_rate or args.learning_rate
        params += network.prepare_optimizer_params(None, lora_lr, lora_lr)
    return params


def run_stage(args, stage: str) -> dict:
    run = begin(args)
    main, fast = run.main, run.fast  # fast_dev_run: a few steps, one validation, nothing written
    output_dir, tracker_dir = Path(args.output_dir), None
    if not fast:
        logging_dir = Path(args.logging_dir or output_dir / "logs")
        if main:
            check_writable_dir(output_dir, "--output_dir")
            check_writable_dir(logging_dir, "--logging_dir")
        tracker_dir = str(logging_dir)
    # Dataset preflight first: bad images, listings or conditions fail in seconds.
    train_group, val_group, ctype = data.build_datasets(args, args.seed, warn=warn_once)
    caching = run.caching
    if fast and args.cache_latents_to_disk:
        args.cache_latents, args.cache_latents_to_disk = True, False  # fast_dev_run writes nothing
    if caching:
        train_group.check_caching_allowed()

    train_group = run.start(tracker_dir, train_group, getattr(args, "overfit_batches", 0) or 0,
                            describe=lambda group: f"stage: {stage}\n" + group.summary())
    accelerator, device, weight_dtype = run.accelerator, run.device, run.weight_dtype
    if val_group is not None:
        accelerator.print(f"validation: {len(val_group.images)} images (loss with fixed noise every epoch)",
                          flush=True)
    if fast:
        accelerator.print(f"fast_dev_run: {fast} training steps and one validation; nothing is saved.")
    # fp32 weights: a new ControlNet copies the UNet's before the UNet is cast to the weight dtype
    model, vae_dtype = run.load_model(dtype=torch.float32)
    text_encoder, vae, unet = model.text_encoder, model.vae, model.unet
    family = families.get(model.family)  # the text conditioning
    run.cache_latents([train_group, val_group], vae, vae_dtype)  # then the GPU memory is the ControlNet's

    trains_cn = stage in ("controlnet", "joint")
    controlnet, network = stage_modules(args, stage, model, device, weight_dtype)
    frozen_fingerprint = None if trains_cn else _fingerprint(controlnet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trains_cn:
            controlnet.enable_gradient_checkpointing()
    to_device(unet, device, weight_dtype)
    to_device(text_encoder, device, weight_dtype)

    params = stage_params(args, controlnet if trains_cn else None, network)
    lr_names = [g["name"] for g in params]
    opt = run.optimization(params, train_group.num_batches_per_epoch)
    optimizer, optimizer_desc, max_train_steps = opt.optimizer, opt.description, opt.max_train_steps
    cn_call = controlnet
    parts = {"controlnet": controlnet} if trains_cn else {}
    if network is not None:
        parts["lora"] = network
    trainable = next(iter(parts.values())) if len(parts) == 1 else torch.nn.ModuleDict(parts)
    params_to_clip = [p for g in params for p in g["params"]]

    objective = diffusion.DiffusionObjective(args, model.noise_scheduler, device)
    noise_generator = run.noise_generator()
    factor, focal = args.loss_weight_factor, (args.focal_gamma if args.use_focal_loss else None)

    def encode(batch):
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(device, dtype=weight_dtype)
            else:
                from library.data import encode_latents

                latents = encode_latents(vae, batch["images"].to(device, dtype=vae_dtype)).to(weight_dtype)
            hidden = family.encode_prompts(model, batch["captions"], device, args.clip_skip,
                                           args.max_token_length).hidden_states.to(weight_dtype)
        return latents, hidden, batch["controlnet_cond"].to(device)

    def forward(noisy, timesteps, hidden, cond, scale=1.0):
        with torch.set_grad_enabled(trains_cn and torch.is_grad_enabled()):
            down, mid = cn_call(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=cond,
                                conditioning_scale=scale, return_dict=False)
        return unet(noisy, timesteps, hidden, down_block_additional_residuals=[d.to(weight_dtype) for d in down],
                    mid_block_additional_residual=mid.to(weight_dtype)).sample

    def loss_of(pred, target, timesteps, batch, cond):
        heat = None
        if factor:
            heat = weighting.latent_weight_source(ctype.weight_source(cond), tuple(pred.shape[-2:]))
        return weighting.weighted_loss(objective, pred, target, timesteps, batch, heat, factor, focal)

    writer = outputs.StageWriter(args, stage, output_dir, controlnet if trains_cn else None, network, unet,
                                 text_encoder, ctype, train_group, optimizer_desc, max_train_steps, opt.num_epochs,
                                 accelerator.mixed_precision, accelerator.print)
    end_epoch = evaluation.EpochEnd(args, accelerator, trainable, val_group, (encode, forward, objective, loss_of),
                                    writer, EarlyStopping(args.early_stopping_patience, args.early_stopping_min_delta),
                                    writes=main and not fast)

    def compute_loss(batch):
        latents, hidden, cond = encode(batch)
        noise, noisy, timesteps = objective.noisy_latents(latents, noise_generator)
        loss = loss_of(forward(noisy, timesteps, hidden, cond.to(weight_dtype)),
                       objective.target(latents, noise, timesteps), timesteps, batch, cond)
        end_epoch.losses.append(loss.detach())
        return loss

    images = ImageLogger(args, accelerator, model, controlnet, trainable,
                         train_group if val_group is None else val_group, ctype, vae_dtype, output_dir,
                         offload_vae=caching)
    keep = args.checkpoints_total_limit
    settings = loop_settings(
        args, opt, output_dir, caching, resume=outputs.resolve_resume(args.resume, output_dir, args.output_name),
        save_last_n_epochs=args.save_last_n_epochs or (keep * args.save_every_n_epochs
                                                      if keep and args.save_every_n_epochs else None),
        save_last_n_steps=args.save_last_n_steps or (keep * args.save_every_n_steps
                                                    if keep and args.save_every_n_steps else None))
    hooks = LoopHooks(compute_loss=compute_loss, save_model=writer.save, trainable=trainable,
                      params_to_clip=params_to_clip, lr_names=lr_names, end_epoch=end_epoch,
                      sample=images, want_sample=images.want)

    run.start_trackers((args.log_prefix or "") + (args.log_tracker_name or f"controlnet_{stage}")
                       + time.strftime("%Y%m%d%H%M%S"))
    state = run.loop(train_group, opt, hooks, settings, noise_generator, resume_latest=True)
    if state.next_batch == train_group.num_batches_per_epoch:
        # The loop stops at --max_train_steps before closing an epoch that ends exactly there; its
        # validation and best checkpoint still count (the stop decision no longer matters).
        end_epoch(state.epoch + 1, state.global_step, state.extra)
    run.finish()
    epochs_done = state.epoch + (1 if state.next_batch else 0)
    unchanged = None if frozen_fingerprint is None else frozen_fingerprint == _fingerprint(controlnet)
    if unchanged is False:  # a frozen ControlNet must come out bit-identical; say so loudly if not
        warn_once("the frozen ControlNet's weights changed during training; please report this.")
    if main and not fast:
        writer.finish(state.global_step, epochs_done, end_epoch.history, unchanged)
    rows = [("stage", stage), *writer.summary_rows(), *run.common_rows(state),
            ("TensorBoard logs", f"{tracker_dir}  (tensorboard --logdir \"{tracker_dir}\")")]
    if unchanged is not None:
        rows.append(("frozen ControlNet unchanged", "yes" if unchanged else "NO"))
    if images.every and not fast:
        rows.append(("image grids", f"{output_dir / 'sample'} and TensorBoard (controlnet/images)"))
    run.print_summary(rows)
    return {"output_dir": output_dir, "state": state, "history": end_epoch.history, "files": writer.files,
            "controlnet_unchanged": unchanged, "total_s": time.perf_counter() - run.t_start,
            "controlnet": controlnet, "network": network}

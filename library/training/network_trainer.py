"""Train a `--network_module` (LoRA / LoCon) on a Stable Diffusion model: the body of train_network.py.

Order of work: check arguments and folders (seconds) -> dataset preflight -> load the model ->
cache latents -> add the network -> optimizer and schedule -> loop -> final save and summary.
"""
from __future__ import annotations

import importlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from library.args import parse_kv_list
from library.errors import UserError
from library.fileio import check_writable_dir
from library.logs import ProgressLogger, format_seconds, format_summary
from library.training import diffusion, metadata as meta_mod
from library.training.checkpoint import model_file_name, top_k_file_name
from library.training.optim import optimizer_name
from library.training.loop import (LoopHooks, LoopSettings, automation_settings, monitored_metric, prepare_group,
                                   run_training_or_exit, steps_and_epochs)
from library.training.text import encode_tokens, tokenize
from library.training.validation import split_validation, validation_loss


def check_arguments(args) -> None:
    if not args.pretrained_model_name_or_path:
        raise UserError("no base model given.",
                        fix="pass --pretrained_model_name_or_path with a local .safetensors checkpoint or a "
                            "diffusers folder.")
    if not args.output_dir:
        raise UserError("no output folder given.", fix="pass --output_dir, the folder for the trained files.")
    if not (args.train_data_dir or args.dataset_config or args.in_json):
        raise UserError("no training images given.",
                        fix="pass --train_data_dir (folders named <repeats>_<name>) or --dataset_config.")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other.",
                        fix="pass at most one of them.")
    for flag in ("unet_lr", "text_encoder_lr"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserError(f"--{flag} must not be negative (got {value}).", fix=f"pass --{flag} >= 0.")
    if args.min_timestep is not None and args.max_timestep is not None and args.min_timestep >= args.max_timestep:
        raise UserError("--min_timestep must be smaller than --max_timestep.", fix="correct one of them.")
    if args.max_timestep is not None and args.max_timestep > 1000:
        raise UserError("--max_timestep must be at most 1000.", fix="pass a value between 1 and 1000.")
    diffusion.check_loss_arguments(args)
    optimizer_name(args)  # raises for conflicting optimizer flags before any model is loaded
    if args.resume and not Path(args.resume).is_dir():
        raise UserError("the --resume folder does not exist.", path=args.resume,
                        fix="pass a '-state' folder written by --save_state.")
    check_network_arguments(args)
    check_log_images(args)


def check_log_images(args) -> None:
    """--log_images_every_n_steps is --sample_every_n_steps: the images are the --sample_prompts ones."""
    every = getattr(args, "log_images_every_n_steps", None)
    if not every:
        return
    if not args.sample_prompts:
        raise UserError("--log_images_every_n_steps logs the images of --sample_prompts, but no prompt file is "
                        "given.", fix="add --sample_prompts prompts.txt (one prompt per line).")
    if args.sample_every_n_epochs or (args.sample_every_n_steps and args.sample_every_n_steps != every):
        raise UserError("--log_images_every_n_steps is another name for --sample_every_n_steps, and a different "
                        "sampling schedule (--sample_every_n_steps / --sample_every_n_epochs) is also given.",
                        fix="pass only one of them.")
    args.sample_every_n_steps = every


def check_network_arguments(args) -> None:
    """The network files exist and fit together, checked before any model is loaded."""
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights.", fix="add --network_weights FILE.")
    flags = [("--network_weights", args.network_weights)] if args.network_weights else []
    flags += [("--base_weights", path) for path in (getattr(args, "base_weights", None) or [])]
    for flag, path in flags:
        if not Path(path).is_file():
            raise UserError(f"the {flag} file does not exist.", path=path, fix=f"pass an existing LoRA file to {flag}.")
    multipliers = getattr(args, "base_weights_multiplier", None) or []
    if len(multipliers) > len(getattr(args, "base_weights", None) or []):
        raise UserError(f"--base_weights_multiplier has {len(multipliers)} values for "
                        f"{len(args.base_weights or [])} --base_weights files.",
                        fix="give at most one multiplier per --base_weights file (missing ones are 1).")


def check_distributed_type(args, accelerator) -> None:
    """Several processes train through DDP (the default) or DeepSpeed ZeRO-2; FSDP cannot train a LoRA."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("the accelerate config asks for FSDP, which shards modules that are called as a whole; a "
                        "LoRA's modules run inside the U-Net's forward, so train_network.py cannot train under FSDP.",
                        fix="launch with a DDP config (configs/accelerate/ddp_2gpu.yaml) or DeepSpeed ZeRO-2 "
                            "(configs/accelerate/deepspeed_zero2.yaml).")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            (args.save_state or args.save_state_on_train_end or args.resume):
        raise UserError("--save_state and --resume do not work with DeepSpeed yet: its optimizer state is split "
                        "over the processes, and the state folder holds one process's view.",
                        fix="drop --save_state/--resume, or launch with a DDP config (configs/accelerate/ddp_2gpu.yaml).")


def seed_everything(seed: int) -> None:
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


def check_fp8_base(args, weight_dtype: torch.dtype) -> None:
    if getattr(args, "fp8_base", False) and weight_dtype not in (torch.float16, torch.bfloat16):
        raise UserError("--fp8_base computes in the --mixed_precision dtype, and training runs in fp32.",
                        fix="add --mixed_precision=bf16 (or fp16 on a CUDA GPU), or drop --fp8_base.")


def store_in_fp8(unet, compute_dtype: torch.dtype) -> None:
    """--fp8_base (kohya's flag) through diffusers' layerwise casting: weights stored as float8_e4m3fn,
    each layer's cast to `compute_dtype` for its forward and back after; norms are left as they are.
    Before the LoRA's weights are trained nothing else changes: the LoRA modules wrap the layers'
    (casting) forwards and keep their own dtype."""
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def frozen_vae_dtype(args, device, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE runs in fp32 on the CPU (half-precision convolutions are slow there) and with --no_half_vae."""
    return torch.float32 if (args.no_half_vae or device.type == "cpu") else weight_dtype


AUTO_TEXT_CACHE_MAX_CAPTIONS = 2000  # about 0.5 GB of SD1 hidden states in fp32


def text_outputs_cacheable(group) -> bool:
    from library.data.text_cache import check_text_encoder_caching_allowed

    try:
        check_text_encoder_caching_allowed(group)
        return len(group.possible_captions()) <= AUTO_TEXT_CACHE_MAX_CAPTIONS
    except UserError:
        return False


def compile_unet(unet, args, device):
    """torch.compile the U-Net after the network is applied (its hooks are traced into the graph).

    On CUDA the default mode is reduce-overhead (CUDA graphs): a batch-1 SD1.5 LoRA step is
    launch-bound, and graphs took it from 178 to 30 ms on an H100 (bench/lora_step_variants.py).
    Each bucket shape compiles once.
    """
    if args.dynamo_backend != "inductor":  # modes belong to inductor; other backends take none
        return torch.compile(unet, backend=args.dynamo_backend)
    mode = args.dynamo_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    return torch.compile(unet, mode=None if mode == "default" else mode)


def import_network_module(name: str):
    from networks.lycoris import resolve_module_name
    name = resolve_module_name(name)  # kohya_ss's lycoris.kohya -> networks.lycoris
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"cannot import --network_module {name} ({err}).",
                        fix="use --network_module networks.lora.") from None


def train(args) -> dict:
    t_start = time.perf_counter()
    check_arguments(args)
    from library.training.accel import common_seed, is_main_process, run_log_dir

    args.output_name = args.output_name or "last"
    args.seed = common_seed(args.seed)  # with several processes: the same on all of them
    main = is_main_process()  # folders, files and messages belong to the main process
    say = print if main else (lambda *a, **k: None)
    fast = args.fast_dev_run
    if fast:  # a few steps of training and validation; nothing is written anywhere
        args.max_validation_steps = min(args.max_validation_steps or fast, fast)
        if args.cache_latents_to_disk:
            args.cache_latents, args.cache_latents_to_disk = True, False
        say(f"fast_dev_run: {fast} training steps and at most {fast} validation batches; nothing is saved "
            "(no model, state, samples or logs; latents are cached in memory only).")
    output_dir = Path(args.output_dir)
    if main and not fast:
        check_writable_dir(output_dir, "--output_dir")
    tracker_dir = None
    if (args.logging_dir or args.log_with) and not fast:
        logging_dir = Path(args.logging_dir or output_dir / "logs")
        if main:
            check_writable_dir(logging_dir, "--logging_dir")
        tracker_dir = run_log_dir(logging_dir, args)  # kohya's <logging_dir>/<log_prefix><time>

    # Dataset preflight first: bad images or folders fail in seconds, before any model is loaded.
    from library.data import build_dataset_group, dataset_configs_from_args, encode_latents
    from library.training.metadata import prefetch_model_hashes

    if main and not fast:  # the LoRA metadata's model hashes, computed while the model loads
        prefetch_model_hashes(args.pretrained_model_name_or_path, args.vae)

    group = build_dataset_group(dataset_configs_from_args(args), seed=args.seed,
                                skip_bad_images=args.skip_bad_images)
    validation_seed = args.validation_seed if args.validation_seed is not None else args.seed
    group, val_group = split_validation(group, args.validation_split, validation_seed)
    if val_group is not None:
        say(f"validation: {len(val_group.images)} held-out images, scored with fixed noise "
            f"(seed {validation_seed})", flush=True)
    caching = args.cache_latents or args.cache_latents_to_disk
    if caching:
        group.check_caching_allowed()
    if args.cache_text_encoder_outputs:
        from library.data.text_cache import check_text_encoder_caching

        check_text_encoder_caching(group, train_text_encoder=not args.network_train_unet_only)
    elif args.network_train_unet_only and text_outputs_cacheable(group):
        # A frozen encoder and fixed captions give the same hidden states every step: encode once.
        args.cache_text_encoder_outputs = True
        say("note: the text encoder is frozen and the captions are fixed, so its outputs are cached "
            "(as --cache_text_encoder_outputs).")

    from library.training.accel import make_accelerator

    seed_everything(args.seed)
    accelerator, weight_dtype = make_accelerator(args, tracker_dir)
    device = accelerator.device
    check_fp8_base(args, weight_dtype)
    check_distributed_type(args, accelerator)
    # Several processes share every batch (each trains on its part); --overfit_batches keeps N of them.
    group = prepare_group(group, accelerator.num_processes, args.overfit_batches or 0)
    if val_group is not None:
        prepare_group(val_group, accelerator.num_processes)
    say(group.summary(), flush=True)
    if accelerator.num_processes > 1:
        say(f"{accelerator.num_processes} processes: each step trains on {accelerator.num_processes} x the batch "
            "size, each process on its share; the steps above count these shared batches.", flush=True)
    if args.overfit_batches:
        say(f"overfit_batches: every epoch trains on the same first {group.num_batches_per_epoch} batches.",
            flush=True)

    from library.models.loading import load_sd_model

    t0 = time.perf_counter()
    vae_dtype = frozen_vae_dtype(args, device, weight_dtype)
    model = load_sd_model(args.pretrained_model_name_or_path, vae_path=args.vae, v2=args.v2,
                          v_parameterization=args.v_parameterization, dtype=weight_dtype, vae_dtype=vae_dtype)
    args.v2 = model.v2  # the weights decide (a wrong --v2 was warned about); the metadata follows
    t_load = time.perf_counter() - t0
    tokenizer, text_encoder, vae, unet = model.tokenizer, model.text_encoder, model.vae, model.unet
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)

    t0 = time.perf_counter()
    if caching:
        to_device(vae, device, vae_dtype)
        # With a disk cache the main process writes the files first; the others then read them.
        with torch.no_grad(), accelerator.main_process_first():
            for g in (group, val_group) if val_group is not None else (group,):
                g.cache_latents(vae, to_disk=args.cache_latents_to_disk, vae_batch_size=args.vae_batch_size,
                                device=device, dtype=vae_dtype, progress=accelerator.is_local_main_process)
        vae.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        to_device(vae, device, vae_dtype)
    t_cache = time.perf_counter() - t0

    # the network
    network_module = import_network_module(args.network_module)
    net_kwargs = parse_kv_list(args.network_args, "--network_args")
    train_unet = not args.network_train_text_encoder_only
    train_te = not args.network_train_unet_only
    network = build_network(args, network_module, net_kwargs, vae, text_encoder, unet, train_te, train_unet,
                            print_fn=accelerator.print)

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()

    network_dtype = weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32
    to_device(unet, device, weight_dtype)
    if getattr(args, "fp8_base", False):
        store_in_fp8(unet, weight_dtype)
    train_unet_model = compile_unet(unet, args, device) if args.torch_compile else unet
    to_device(text_encoder, device, weight_dtype)
    to_device(network, device, network_dtype)
    text_cache = None
    if args.cache_text_encoder_outputs:  # the encoder is frozen (checked above): encode each caption once
        from library.data.text_cache import TextEncoderOutputCache

        t0 = time.perf_counter()
        text_cache = TextEncoderOutputCache(lambda captions: encode_tokens(
            text_encoder, tokenize(tokenizer, captions, args.max_token_length).to(device), args.clip_skip))
        with torch.no_grad(), accelerator.autocast():  # as compute_loss runs, so outputs are equal
            text_cache.fill(group.possible_captions(), batch_size=args.train_batch_size)
        t_cache += time.perf_counter() - t0

    lr = args.learning_rate
    params = network.prepare_optimizer_params(args.text_encoder_lr if train_te else None,
                                              args.unet_lr if train_unet else None, lr)
    if isinstance(params, tuple):  # kohya networks may also return lr descriptions
        params = params[0]
    lr_names = [g.get("name") or ("textencoder" if i == 0 and train_te else "unet") for i, g in enumerate(params)]

    from library.training.optim import adaptive_lr_logs, build_optimizer, build_scheduler

    optimizer, optimizer_desc = build_optimizer(args, params, device.type)
    max_train_steps, num_epochs = steps_and_epochs(group.num_batches_per_epoch, args.gradient_accumulation_steps,
                                                   args.max_train_steps, args.max_train_epochs)
    lr_scheduler = build_scheduler(args, optimizer, max_train_steps)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.train_batch_size and accelerator.state.deepspeed_plugin is not None:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                args.train_batch_size
        network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
    else:
        # The network stays unwrapped: its modules run inside the U-Net, never through a DDP
        # wrapper, so the training loop averages its gradients over the processes itself.
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    trainable = accelerator.unwrap_model(network)
    params_to_clip = [p for p in trainable.parameters() if p.requires_grad]

    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)
    base_meta = meta_mod.training_metadata(
        args, group_meta=group.metadata(), optimizer_desc=optimizer_desc, max_train_steps=max_train_steps,
        num_epochs=num_epochs, num_batches_per_epoch=group.num_batches_per_epoch, network_args=net_kwargs,
        mixed_precision=accelerator.mixed_precision, num_processes=accelerator.num_processes)
    progress = ProgressLogger(accelerator)
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    objective = diffusion.DiffusionObjective(args, model.noise_scheduler, device)  # noise/timesteps/loss flags

    saved_files: list[Path] = []

    def save_model(kind, epoch, step):
        if kind == "top":  # --save_top_k
            path = output_dir / top_k_file_name(args.output_name, args.save_model_as, step)
        else:
            numbered = {"epoch": epoch} if kind == "epoch" else ({"step": step} if kind == "step" else {})
            path = output_dir / model_file_name(args.output_name, args.save_model_as, **numbered)
        metadata = meta_mod.for_save(base_meta, epoch, step)
        if args.no_metadata:  # kohya keeps the few keys loaders need to identify the file
            metadata = {k: v for k, v in metadata.items() if k in meta_mod.MINIMUM_KEYS or k.startswith("modelspec.")}
        trainable.save_weights(str(path), save_dtype, metadata if args.save_model_as == "safetensors" else None)
        if args.network_module == "networks.lora":  # the file contract, checked on every file we write
            from library.lora_tools.verify import check_saved_lora
            check_saved_lora(path, unet, text_encoder)
        accelerator.print(f"saved {path}")
        saved_files.append(path)
        return path

    te_trains = train_te and any(p.requires_grad for n, p in trainable.named_parameters() if "lora_te" in n)

    def compute_loss(batch, generator=None):
        generator = generator or noise_generator  # validation passes a fixed one
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(device, dtype=weight_dtype, non_blocking=True)
            else:
                # same encoding as the latent cache, so cached and uncached runs train on equal inputs
                images = batch["images"].to(device, dtype=vae_dtype, non_blocking=True)
                latents = encode_latents(vae, images).to(weight_dtype)
        if text_cache is not None:
            hidden = text_cache.lookup(batch["captions"], device)
        else:
            ids = tokenize(tokenizer, batch["captions"], args.max_token_length).to(device)
            with torch.set_grad_enabled(te_trains):
                hidden = encode_tokens(text_encoder, ids, args.clip_skip)
        noise, noisy, timesteps = objective.noisy_latents(latents, generator)
        pred = train_unet_model(noisy, timesteps, hidden.to(weight_dtype)).sample
        return objective.loss(pred, objective.target(latents, noise, timesteps), timesteps, batch)

    def validate() -> dict:
        trainable.eval()  # no dropout: the same weights give the same number
        with accelerator.autocast():
            loss = validation_loss(val_group, validation_seed, compute_loss, device, args.max_validation_steps,
                                   accelerator)
        trainable.train()
        return {"loss/validation": loss}

    def after_step(step):
        logs = adaptive_lr_logs(optimizer, lr_names)  # d*lr of Prodigy / DAdapt, as kohya logs it
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = trainable.apply_max_norm_regularization(args.scale_weight_norms, device)
            # kohya's TensorBoard names
            logs.update({"max_norm/keys_scaled": keys_scaled, "norm/avg_key_norm": mean_norm,
                         "max_norm/max_key_norm": max_norm})
        return logs

    sampling = _sampling_hooks(args, accelerator, model, output_dir, weight_dtype, device, tracker_dir)

    settings = LoopSettings(
        max_train_steps=max_train_steps, num_epochs=num_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        output_dir=output_dir, output_name=args.output_name, seed=args.seed,
        save_every_n_epochs=args.save_every_n_epochs, save_every_n_steps=args.save_every_n_steps,
        save_last_n_epochs=args.save_last_n_epochs, save_last_n_steps=args.save_last_n_steps,
        save_state=args.save_state, save_state_on_train_end=args.save_state_on_train_end, resume=args.resume,
        num_workers=0 if caching else min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        persistent_workers=args.persistent_data_loader_workers, log_every_n_steps=args.log_every_n_steps,
        validate_every_n_steps=args.validate_every_n_steps,
        validate_every_n_epochs=args.validate_every_n_epochs, **automation_settings(args))
    hooks = LoopHooks(compute_loss=compute_loss, save_model=save_model, trainable=trainable,
                      params_to_clip=params_to_clip, lr_names=lr_names, after_step=after_step,
                      sample=sampling[0], want_sample=sampling[1],
                      validate=validate if val_group is not None else None)

    if tracker_dir:
        from library.training.accel import init_trackers

        init_trackers(accelerator, args, "network_train")
    t_before_loop = time.perf_counter()
    state = run_training_or_exit(accelerator, group, optimizer, lr_scheduler, hooks, settings, noise_generator,
                                 progress)
    accelerator.end_training()

    total = time.perf_counter() - t_start
    rows = [("trained network", saved_files[-1] if saved_files else "-"),
            ("steps / epochs", f"{state.global_step} / {state.epoch + (1 if state.next_batch else 0)}"),
            ("average loss (last 100 steps)", f"{progress.average_loss:.4f}"),
            ("model load / latent caching", f"{format_seconds(t_load)} / {format_seconds(t_cache)}"),
            ("training time", format_seconds(time.perf_counter() - t_before_loop)),
            ("total time", format_seconds(total))]
    if tracker_dir:
        rows.append(("TensorBoard logs", f"{tracker_dir}  (tensorboard --logdir \"{tracker_dir}\")"))
    if (args.save_state or args.save_state_on_train_end) and not fast:
        rows.append(("state for --resume", output_dir / f"{args.output_name}-state"))
    if sampling[0] is not None and not fast:
        rows.append(("sample images", output_dir / "sample"))
    top_k = state.extra.get("top_k") or []
    if top_k:
        rows.append((f"best {len(top_k)} by {monitored_metric(settings, hooks)}",
                     ", ".join(f"{e['file']} ({e['value']:.5f})" for e in top_k)))
    accelerator.print(format_summary("training finished", rows))
    return {"files": saved_files, "state": state, "output_dir": output_dir, "tracker_dir": tracker_dir,
            "step_end_times": progress.step_end_times, "started_at": t_start, "loop_started_at": t_before_loop,
            "model_load_s": t_load, "caching_s": t_cache, "network": trainable}



def build_network(args, network_module, net_kwargs, vae, text_encoder, unet, train_te=True, train_unet=True,
                  print_fn=print):
    """kohya's order: merge --base_weights into the model, create the network (ranks from
    --network_weights with --dim_from_weights), patch the model, load --network_weights, set
    --network_multiplier."""
    multipliers = getattr(args, "base_weights_multiplier", None) or []
    for i, path in enumerate(getattr(args, "base_weights", None) or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        merged, weights = network_module.create_network_from_weights(multiplier, path, vae, text_encoder, unet,
                                                                     for_inference=True)
        # on the CPU in the model's dtype: the model is not on the GPU yet
        merged.merge_to(text_encoder, unet, weights, None, "cpu")
        print_fn(f"merged {path} into the base model (multiplier {multiplier})")
    if args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, vae, text_encoder, unet,
                                                                **net_kwargs)
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
                                                neuron_dropout=args.network_dropout, **net_kwargs)
    network.apply_to(text_encoder, unet, train_te, train_unet)
    if args.network_weights:  # also with --dim_from_weights, which only takes the ranks (as kohya)
        info = network.load_weights(args.network_weights)
        print_fn(f"loaded network weights from {args.network_weights}: {info}")
    if args.network_multiplier != 1.0:
        network.set_multiplier(args.network_multiplier)
    return network


def _sampling_hooks(args, accelerator, model, output_dir, dtype, device, tracker_dir):
    if not args.sample_prompts:
        return None, None
    from library.training.sampling import generate_samples, read_prompt_file

    # read (and every --ss sampler checked) now, not at the first sample
    prompts = read_prompt_file(args.sample_prompts, tuple(args.resolution or (512, 512)))

    def want(epoch, step):
        """kohya's rule: --sample_at_first at step 0; with --sample_every_n_epochs only at epoch ends
        (--sample_every_n_steps is then ignored); else every N steps."""
        if step == 0 and epoch is None:
            return args.sample_at_first
        if args.sample_every_n_epochs:
            return epoch is not None and epoch % args.sample_every_n_epochs == 0
        return epoch is None and bool(args.sample_every_n_steps) and step % args.sample_every_n_steps == 0

    def sample(epoch, step):
        if not accelerator.is_main_process:
            return
        model.vae.to(device)
        prefix = f"{args.output_name}_" + (f"e{epoch:06d}" if epoch is not None else f"{step:06d}")
        generate_samples(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                         base_scheduler=model.noise_scheduler, prompts=prompts, sampler=args.sample_sampler,
                         out_dir=output_dir / "sample", name_prefix=prefix, device=device, dtype=dtype,
                         clip_skip=args.clip_skip, seed_base=args.seed, trackers=accelerator.trackers, step=step)
    return sample, want

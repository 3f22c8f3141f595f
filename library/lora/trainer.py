"""Train a `--network_module` (LoRA / LoCon / ...) on a Stable Diffusion model: the body of train_network.py.

Order of work (the steps of library/training/run.py): check arguments and folders (seconds) ->
dataset preflight -> load the model -> cache latents -> add the network (through the
--network_module contract, library/lora/network_module.py) -> optimizer and schedule -> loop ->
final save and summary. What is this trainer's own: the network, its loss (text encoder and UNet
through the network), its files (kohya's names and ss_* metadata) and sample images.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from library.args import parse_kv_list
from library.data import build_dataset_group, dataset_configs_from_args, encode_latents
from library.errors import UserError
from library.fileio import check_writable_dir
from library.logs import format_seconds
from library.lora.network_module import build_network, check_saved_file, import_network_module, optimizer_params
from library.models import families
from library.models.families import TextConditioning
from library.training import diffusion, metadata as meta_mod
from library.training.accel import run_log_dir
from library.training.checkpoint import model_file_name, top_k_file_name
from library.training.loop import LoopHooks, monitored_metric, prepare_group
from library.training.optim import adaptive_lr_logs, optimizer_name
from library.training.run import begin, loop_settings, save_dtype, to_device
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
    if isinstance(args.text_encoder_lr, list):  # kohya: one per text encoder; SD1/SD2 have one, the first is used
        args.text_encoder_lr = args.text_encoder_lr[0] if args.text_encoder_lr else None
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


def train(args) -> dict:
    check_arguments(args)
    args.output_name = args.output_name or "last"
    run = begin(args)
    say, fast = run.print, run.fast
    if fast:
        apply_fast_dev_run(args, say)
    output_dir = Path(args.output_dir)
    if run.main and not fast:
        check_writable_dir(output_dir, "--output_dir")
    tracker_dir = None
    if (args.logging_dir or args.log_with) and not fast:
        logging_dir = Path(args.logging_dir or output_dir / "logs")
        if run.main:
            check_writable_dir(logging_dir, "--logging_dir")
        tracker_dir = run_log_dir(logging_dir, args)  # kohya's <logging_dir>/<log_prefix><time>

    # Dataset preflight first: bad images or folders fail in seconds, before any model is loaded.
    if run.main and not fast:  # the LoRA metadata's model hashes, computed while the model loads
        meta_mod.prefetch_model_hashes(args.pretrained_model_name_or_path, args.vae)
    group = build_dataset_group(dataset_configs_from_args(args), seed=args.seed, skip_bad_images=args.skip_bad_images)
    if getattr(args, "debug_dataset", False):  # kohya: show the batches, train nothing
        from library.data.debug import debug_dataset

        return {"debug_dataset": debug_dataset(group, output_dir / "debug_dataset" if run.main else None)}
    validation_seed = args.validation_seed if args.validation_seed is not None else args.seed
    group, val_group = split_validation(group, args.validation_split, validation_seed)
    if val_group is not None:
        say(f"validation: {len(val_group.images)} held-out images, scored with fixed noise "
            f"(seed {validation_seed})", flush=True)
    if run.caching:
        group.check_caching_allowed()
    check_text_caching(args, group, say)

    group = run.start(tracker_dir, group, args.overfit_batches or 0)
    accelerator, device, weight_dtype = run.accelerator, run.device, run.weight_dtype
    check_fp8_base(args, weight_dtype)
    check_distributed_type(args, accelerator)
    if val_group is not None:
        prepare_group(val_group, accelerator.num_processes)
    model, vae_dtype = run.load_model()
    text_encoder, vae, unet = model.text_encoder, model.vae, model.unet
    run.cache_latents([group, val_group], vae, vae_dtype)

    # the network: everything it is asked for goes through the --network_module contract
    network_module = import_network_module(args.network_module)
    net_kwargs = parse_kv_list(args.network_args, "--network_args")
    train_unet, train_te = not args.network_train_text_encoder_only, not args.network_train_unet_only
    network = build_network(args, network_module, net_kwargs, vae, text_encoder, unet, train_te, train_unet,
                            print_fn=accelerator.print)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()
    to_device(unet, device, weight_dtype)
    if getattr(args, "fp8_base", False):
        store_in_fp8(unet, weight_dtype)
    train_unet_model = compile_unet(unet, args, device) if args.torch_compile else unet
    to_device(text_encoder, device, weight_dtype)
    to_device(network, device, weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32)
    family = families.get(model.family)  # the text conditioning (and next, SDXL's extra conditions)
    text_cache = cache_text_outputs(args, run, group, family, model)

    params = optimizer_params(network, args.text_encoder_lr if train_te else None, args.unet_lr if train_unet else None,
                              args.learning_rate)
    lr_names = [g.get("name") or ("textencoder" if i == 0 and train_te else "unet") for i, g in enumerate(params)]
    opt = run.optimization(params, group.num_batches_per_epoch, network=network)
    trainable = accelerator.unwrap_model(opt.network)
    params_to_clip = [p for p in trainable.parameters() if p.requires_grad]
    base_meta = meta_mod.training_metadata(
        args, group_meta=group.metadata(), optimizer_desc=opt.description, max_train_steps=opt.max_train_steps,
        num_epochs=opt.num_epochs, num_batches_per_epoch=group.num_batches_per_epoch, network_args=net_kwargs,
        mixed_precision=accelerator.mixed_precision, num_processes=accelerator.num_processes)
    noise_generator = run.noise_generator()
    objective = diffusion.DiffusionObjective(args, model.noise_scheduler, device)  # noise/timesteps/loss flags
    saved_files: list[Path] = []

    def save_model(kind, epoch, step):
        path = output_dir / saved_file_name(args, kind, epoch, step)
        metadata = meta_mod.for_save(base_meta, epoch, step)
        if args.no_metadata:  # kohya keeps the few keys loaders need to identify the file
            metadata = {k: v for k, v in metadata.items() if k in meta_mod.MINIMUM_KEYS or k.startswith("modelspec.")}
        trainable.save_weights(str(path), save_dtype(args), metadata if args.save_model_as == "safetensors" else None)
        check_saved_file(path, unet, text_encoder)  # the file contract, for every module and every file
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
            cond = TextConditioning(text_cache.lookup(batch["captions"], device))
        else:
            with torch.set_grad_enabled(te_trains):
                cond = family.encode_prompts(model, batch["captions"], device, args.clip_skip, args.max_token_length,
                                             args.weighted_captions)
        noise, noisy, timesteps = objective.noisy_latents(latents, generator)
        pred = train_unet_model(noisy, timesteps, **cond.unet_kwargs(weight_dtype)).sample
        return objective.loss(pred, objective.target(latents, noise, timesteps), timesteps, batch)

    def validate() -> dict:
        trainable.eval()  # no dropout: the same weights give the same number
        with accelerator.autocast():
            loss = validation_loss(val_group, validation_seed, compute_loss, device, args.max_validation_steps,
                                   accelerator)
        trainable.train()
        return {"loss/validation": loss}

    def after_step(step):
        logs = adaptive_lr_logs(opt.optimizer, lr_names)  # d*lr of Prodigy / DAdapt, as kohya logs it
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = trainable.apply_max_norm_regularization(args.scale_weight_norms, device)
            # kohya's TensorBoard names
            logs.update({"max_norm/keys_scaled": keys_scaled, "norm/avg_key_norm": mean_norm,
                         "max_norm/max_key_norm": max_norm})
        return logs

    sample, want_sample = _sampling_hooks(args, accelerator, model, output_dir, weight_dtype, device, tracker_dir)
    settings = loop_settings(args, opt, output_dir, run.caching, validate_every_n_steps=args.validate_every_n_steps,
                             validate_every_n_epochs=args.validate_every_n_epochs)
    hooks = LoopHooks(compute_loss=compute_loss, save_model=save_model, trainable=trainable,
                      params_to_clip=params_to_clip, lr_names=lr_names, after_step=after_step,
                      sample=sample, want_sample=want_sample, validate=validate if val_group is not None else None)
    if tracker_dir:
        run.start_trackers(args.log_tracker_name or "network_train")
    state = run.loop(group, opt, hooks, settings, noise_generator)

    rows = [("trained network", saved_files[-1] if saved_files else "-"), *run.common_rows(state),
            ("total time", format_seconds(time.perf_counter() - run.t_start))]
    if tracker_dir:
        rows.append(("TensorBoard logs", f"{tracker_dir}  (tensorboard --logdir \"{tracker_dir}\")"))
    if (args.save_state or args.save_state_on_train_end) and not fast:
        rows.append(("state for --resume", output_dir / f"{args.output_name}-state"))
    if sample is not None and not fast:
        rows.append(("sample images", output_dir / "sample"))
    top_k = state.extra.get("top_k") or []
    if top_k:
        rows.append((f"best {len(top_k)} by {monitored_metric(settings, hooks)}",
                     ", ".join(f"{e['file']} ({e['value']:.5f})" for e in top_k)))
    run.finish(rows)
    return {"files": saved_files, "state": state, "output_dir": output_dir, "tracker_dir": tracker_dir,
            "step_end_times": run.progress.step_end_times, "started_at": run.t_start, "loop_started_at": run.t_loop,
            "model_load_s": run.t_load, "caching_s": run.t_cache, "network": trainable}


def apply_fast_dev_run(args, say) -> None:
    """--fast_dev_run N: N steps of training and at most N validation batches; nothing is written anywhere."""
    fast = args.fast_dev_run
    args.max_validation_steps = min(args.max_validation_steps or fast, fast)
    if args.cache_latents_to_disk:
        args.cache_latents, args.cache_latents_to_disk = True, False
    say(f"fast_dev_run: {fast} training steps and at most {fast} validation batches; nothing is saved "
        "(no model, state, samples or logs; latents are cached in memory only).")


def check_text_caching(args, group, say) -> None:
    """--cache_text_encoder_outputs checked; switched on by itself where it cannot change the result."""
    if args.cache_text_encoder_outputs:
        from library.data.text_cache import check_text_encoder_caching

        check_text_encoder_caching(group, train_text_encoder=not args.network_train_unet_only)
    elif args.network_train_unet_only and text_outputs_cacheable(group):
        # A frozen encoder and fixed captions give the same hidden states every step: encode once.
        args.cache_text_encoder_outputs = True
        say("note: the text encoder is frozen and the captions are fixed, so its outputs are cached "
            "(as --cache_text_encoder_outputs).")


def cache_text_outputs(args, run, group, family, model):
    """With --cache_text_encoder_outputs (the encoder is frozen, checked above): each caption once."""
    if not args.cache_text_encoder_outputs:
        return None
    from library.data.text_cache import TextEncoderOutputCache

    t0 = time.perf_counter()
    text_cache = TextEncoderOutputCache(lambda captions: family.encode_prompts(
        model, captions, run.device, args.clip_skip, args.max_token_length, args.weighted_captions).hidden_states)
    with torch.no_grad(), run.accelerator.autocast():  # as compute_loss runs, so outputs are equal
        text_cache.fill(group.possible_captions(), batch_size=args.train_batch_size)
    run.t_cache += time.perf_counter() - t0
    return text_cache


def saved_file_name(args, kind: str, epoch, step) -> str:
    """The loop's save kinds -> kohya's file names (--save_top_k files carry their step)."""
    if kind == "top":
        return top_k_file_name(args.output_name, args.save_model_as, step)
    numbered = {"epoch": epoch} if kind == "epoch" else ({"step": step} if kind == "step" else {})
    return model_file_name(args.output_name, args.save_model_as, **numbered)

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
                         clip_skip=args.clip_skip, trackers=accelerator.trackers, step=step)
    return sample, want

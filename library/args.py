"""Shared argument groups and `--config_file` handling.

Each script builds ONE argparse parser from these groups plus its own options. That parser is the
single source of truth: the TOML config file, the GUI's forms and tooltips and the docs are derived
from it. Flag names and defaults follow kohya sd-scripts so existing commands run unchanged.

Range checks are argparse `type=` functions (`positive_int`, ...): they reject bad command-line
values and are applied again to values that come from a config file.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from library.errors import UserError


# --- value types with range checks --------------------------------------------------------------

def _number(kind, check, what):
    def convert(value):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not check(number):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    convert.__name__ = what.replace(" ", "_").replace("-", "_")
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number between 0 and 1")


def file_name(value):
    """--output_name: a name without folders, so every trained file stays inside --output_dir."""
    from library.fileio import check_output_name

    try:
        return check_output_name(value, "")
    except UserError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a plain file name (no '/', '\\' or '..'): the files "
                                         "stay inside --output_dir; choose the folder there") from None


def resolution(value) -> tuple[int, int]:
    """'512' or '512,768' (kohya: width,height) -> (w, h)."""
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    elif isinstance(value, int):
        parts = [str(value)]
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'size' or 'width,height', got {value!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 64 or any(s % 8 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected 'size' or 'width,height' with sizes >= 64 divisible by 8, got {value!r}")
    return sizes[0], sizes[1]


# --- shared argument groups ---------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config")
    g.add_argument("--config_file", type=str, default=None,
                   help="TOML file of arguments (keys are the flag names without '--'; [sections] are "
                        "allowed for grouping). Command-line flags override it.")
    g.add_argument("--output_config", action="store_true",
                   help="write the effective arguments to --config_file and exit")
    g.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model: a local single-file checkpoint (.safetensors, or .ckpt loaded "
                        "weights-only) in the original SD layout, or a diffusers folder")
    g.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    g.add_argument("--v_parameterization", action="store_true",
                   help="train with v-prediction (SD2.x 768-v models)")
    g.add_argument("--vae", type=str, default=None,
                   help="replace the model's VAE with this file (.safetensors) or diffusers folder")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="accepted for kohya compatibility; the tokenizer ships with this project")
    g.add_argument("--clip_skip", type=positive_int, default=None,
                   help="use the output of the n-th layer from the end of the text encoder (2 = penultimate)")
    g.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225],
                   help="max caption length in tokens (75 by default); 150 or 225 encode the caption "
                        "in 75-token windows, as kohya")


def add_dataset_arguments(parser: argparse.ArgumentParser, reg_and_config: bool = True) -> None:
    """`reg_and_config=False` leaves out --reg_data_dir and --dataset_config, for a script whose
    datasets cannot use them (train_controlnet.py): the GUI's forms then show no field for them."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="folder whose subfolders are named <repeats>_<name>, e.g. 10_mychar, holding "
                        "images and caption files")
    if reg_and_config:
        g.add_argument("--reg_data_dir", type=str, default=None,
                       help="folder of regularization images, same layout as --train_data_dir")
        g.add_argument("--dataset_config", type=str, default=None,
                       help="dataset TOML in kohya's [general]/[[datasets]]/[[datasets.subsets]] schema")
    g.add_argument("--in_json", type=str, default=None,
                   help="kohya fine-tuning metadata JSON ({image: {caption, tags, train_resolution}}); "
                        "images in --train_data_dir")
    g.add_argument("--dataset_repeats", type=positive_int, default=1,
                   help="repeats of an --in_json dataset (and of dataset-config subsets without num_repeats)")
    g.add_argument("--resolution", type=resolution, default=None,
                   help="training resolution: 'size' or 'width,height' (default 512)")
    g.add_argument("--caption_extension", type=str, default=".caption",
                   help="extension of caption files (a .txt beside the image is used when none exists)")
    g.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle comma-separated caption tags")
    g.add_argument("--keep_tokens", type=non_negative_int, default=0,
                   help="keep the first N comma-separated tags in place when shuffling")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="marks the fixed part of a caption: 'fixed ||| shuffled ||| fixed suffix'")
    g.add_argument("--caption_separator", type=str, default=",", help="separator of caption tags")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="joins tags that shuffle and drop together; becomes --caption_separator afterwards")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--caption_dropout_rate", type=unit_float, default=0.0,
                   help="share of images trained with an empty caption (0-1)")
    g.add_argument("--caption_dropout_every_n_epochs", type=non_negative_int, default=0,
                   help="train every N-th epoch with all captions empty")
    g.add_argument("--caption_tag_dropout_rate", type=unit_float, default=0.0,
                   help="chance of dropping each shuffled tag (0-1)")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument("--color_aug", action="store_true",
                   help="weak colour augmentation (not with latent caching)")
    g.add_argument("--random_crop", action="store_true", help="random crops instead of center crops")
    g.add_argument("--alpha_mask", action="store_true",
                   help="use each image's alpha channel as a loss mask (transparent = not trained; images "
                        "without alpha are trained everywhere)")
    g.add_argument("--enable_bucket", action="store_true",
                   help="aspect-ratio bucketing: train each image at the bucket nearest its aspect ratio")
    g.add_argument("--min_bucket_reso", type=positive_int, default=256, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=positive_int, default=1024, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=positive_int, default=64,
                   help="bucket sides are multiples of this (divisible by 8)")
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="never upscale: small images get a bucket of their own size")
    g.add_argument("--prior_loss_weight", type=non_negative_float, default=1.0,
                   help="loss weight of regularization images")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="train without unreadable images instead of stopping")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode all images with the VAE once before training and keep the latents in memory")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="like --cache_latents, and also keep them in a file next to each image for later runs")
    g.add_argument("--vae_batch_size", type=positive_int, default=1, help="batch size for latent caching")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode each caption once before training (needs --network_train_unet_only; not "
                        "with caption shuffling or tag dropout)")
    g.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=8,
                   help="max DataLoader worker processes (0 with cached latents)")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep DataLoader workers alive between epochs")


def add_precision_alias(group) -> None:
    """Lightning's spelling of --mixed_precision, applied by training.accel.apply_precision_alias; one
    widget (mixed_precision) in the GUI is enough, so it is not listed."""
    group.add_argument("--precision", type=str, default=None,
                       choices=["16-mixed", "bf16-mixed", "32", "32-true", "16", "bf16"], help=argparse.SUPPRESS)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default=None, help="folder for the trained files")
    g.add_argument("--output_name", type=file_name, default=None,
                   help="base name of the trained files (default 'last'), without folders")
    g.add_argument("--train_batch_size", type=positive_int, default=1,
                   help="batch size (per process: N processes train on N x this many images per step)")
    g.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps to train")
    g.add_argument("--max_train_epochs", type=positive_int, default=None,
                   help="epochs to train (overrides --max_train_steps)")
    g.add_argument("--gradient_accumulation_steps", "--accumulate_grad_batches", type=positive_int, default=1,
                   help="batches accumulated into one optimizer step (Lightning's --accumulate_grad_batches "
                        "works too)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (slower)")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="mixed precision (fp16 needs CUDA; without it training runs in fp32). Lightning's "
                        "--precision 16-mixed|bf16-mixed|32 is accepted too")
    add_precision_alias(g)
    g.add_argument("--full_fp16", action="store_true", help="fp16 training including gradients")
    g.add_argument("--full_bf16", action="store_true", help="bf16 training including gradients")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 under mixed precision")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed: model init, data order, augmentations and noise all follow from it, so a "
                        "run is reproducible (also with several processes)")
    g.add_argument("--max_grad_norm", "--gradient_clip_val", type=non_negative_float, default=1.0,
                   help="clip gradients to this norm; 0 turns clipping off (Lightning's --gradient_clip_val works "
                        "too)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch SDPA attention (always used)")
    g.add_argument("--xformers", action="store_true", help="accepted for compatibility; SDPA is used")
    g.add_argument("--mem_eff_attn", action="store_true", help="accepted for compatibility; SDPA is used")
    g.add_argument("--lowram", action="store_true", help="accepted for compatibility")
    g.add_argument("--highvram", action="store_true", help="accepted for compatibility")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the U-Net with torch.compile (on a GPU with CUDA graphs: several times faster "
                        "at small batch sizes; the first steps are slow while it compiles)")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend")
    g.add_argument("--dynamo_mode", type=str, default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: reduce-overhead, i.e. CUDA graphs, on a GPU; default on a CPU)")
    add_loss_arguments(parser, g)  # every trainer that trains gets the loss/noise flags

    s = parser.add_argument_group("saving")
    s.add_argument("--save_model_as", type=str, default="safetensors", choices=["safetensors", "ckpt", "pt"],
                   help="file format of the trained network")
    s.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of saved weights (default: float)")
    s.add_argument("--save_every_n_epochs", type=positive_int, default=None, help="save every N epochs")
    s.add_argument("--save_every_n_steps", type=positive_int, default=None, help="save every N steps")
    s.add_argument("--save_last_n_epochs", type=positive_int, default=None,
                   help="keep only the last N files saved every N epochs")
    s.add_argument("--save_last_n_steps", type=positive_int, default=None,
                   help="keep only the files saved in the last N steps")
    s.add_argument("--save_state", action="store_true",
                   help="also save the training state (optimizer, scheduler, RNG, data position) for --resume")
    s.add_argument("--save_state_on_train_end", action="store_true",
                   help="save the training state at the end even without --save_state")
    s.add_argument("--resume", "--resume_from_checkpoint", type=str, default=None,
                   help="continue from a state folder written by --save_state (--resume_from_checkpoint works "
                        "too)")

    lg = parser.add_argument_group("logging")
    lg.add_argument("--logging_dir", type=str, default=None, help="folder for TensorBoard logs")
    lg.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                    help="logger (tensorboard when --logging_dir is given); wandb and all (both) need "
                         "pip install wandb and run offline unless WANDB_MODE is set")
    lg.add_argument("--log_prefix", type=str, default=None,
                    help="prefix of each run's log folder name (<logging_dir>/<prefix><time>)")
    lg.add_argument("--log_tracker_name", type=str, default=None,
                    help="tracker name: the TensorBoard subfolder and the wandb project (default: the script's)")
    lg.add_argument("--log_tracker_config", type=str, default=None,
                    help="TOML of tracker init arguments, e.g. [wandb] with entity, tags, notes")
    lg.add_argument("--log_config", action="store_true",
                    help="store the training arguments in the trackers (TensorBoard hparams, wandb config)")
    lg.add_argument("--wandb_run_name", type=str, default=None, help="name of the wandb run")
    lg.add_argument("--wandb_api_key", type=str, default=None,
                    help="wandb API key, for WANDB_MODE=online (kept out of --log_config)")
    lg.add_argument("--log_every_n_steps", type=positive_int, default=1,
                    help="log loss and lr every N steps (fewer host syncs on a GPU)")
    lg.add_argument("--profile", action="store_true",
                    help="profile steps 3-7: print where the time goes and save a trace in --output_dir")
    lg.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")


def steps_or_ratio(value):
    """kohya's int_or_float for step counts: '10' -> 10 steps, '0.1' or '10%' -> ratio 0.1 of the
    training steps; a number >= 1 must be whole."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or a ratio below 1, got {value!r}") from None
    if number < 0 or (number >= 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a whole step count or a ratio below 1, got {value!r}")
    return int(number) if number >= 1 or number == 0 else number


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="optimizer: AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, "
                        "Prodigy, DAdaptAdam (and kohya's other DAdapt* names), Adafactor, a torch.optim class "
                        "name, or module.ClassName. 8-bit/paged ones need CUDA and bitsandbytes; Lion needs "
                        "lion-pytorch, Prodigy prodigyopt, DAdapt* dadaptation")
    g.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")
    g.add_argument("--learning_rate", type=positive_float, default=2e-6,
                   help="learning rate (around 1.0 for Prodigy and DAdapt*)")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help='extra optimizer arguments, e.g. "weight_decay=0.01" "betas=0.9,0.999" '
                        '(Adafactor: "relative_step=False" "scale_parameter=False" "warmup_init=False")')
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
                            "piecewise_constant", "adafactor"],
                   help="learning-rate schedule (adafactor: Adafactor's own, with --optimizer_type Adafactor)")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="any scheduler class instead: a torch.optim.lr_scheduler name or module.ClassName, "
                        "built with --lr_scheduler_args")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help='extra scheduler arguments, e.g. "T_max=100"')
    g.add_argument("--lr_warmup_steps", type=steps_or_ratio, default=0,
                   help="warmup steps (an integer), or a fraction of the training steps (< 1, or '10%%')")
    g.add_argument("--lr_decay_steps", type=steps_or_ratio, default=0,
                   help="decay steps of warmup_stable_decay (an integer, or a fraction < 1 of the training steps)")
    g.add_argument("--lr_scheduler_num_cycles", type=positive_int, default=1,
                   help="restarts for cosine_with_restarts (cycles for cosine_with_min_lr, warmup_stable_decay)")
    g.add_argument("--lr_scheduler_power", type=positive_float, default=1.0, help="power for polynomial")
    g.add_argument("--lr_scheduler_timescale", type=positive_int, default=None,
                   help="timescale of inverse_sqrt (default: the warmup steps)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=unit_float, default=None,
                   help="final lr as a share of the start for cosine_with_min_lr and warmup_stable_decay")


def add_loss_arguments(parser: argparse.ArgumentParser, group=None) -> None:
    """Noise, timestep and loss options (kohya names and defaults); all off by default. They join
    `group` when given (add_training_arguments passes its own, so the GUI shows them under Training)."""
    g = group if group is not None else parser.add_argument_group("loss and noise")
    g.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
                   help="loss function (huber and smooth_l1 are robust to outliers; see --huber_*)")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                   help="how the Huber threshold changes with the timestep")
    g.add_argument("--huber_c", type=positive_float, default=0.1, help="Huber threshold (decay parameter)")
    g.add_argument("--huber_scale", type=positive_float, default=1.0,
                   help="Huber threshold scale (constant and exponential schedules)")
    g.add_argument("--min_snr_gamma", type=non_negative_float, default=None,
                   help="Min-SNR weighting: lower values weigh noisy timesteps less; 5 is recommended (0: off)")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="weigh the loss by 1/sqrt(SNR) (debiased estimation)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="with --v_parameterization: weigh timesteps like a noise-prediction loss")
    g.add_argument("--v_pred_like_loss", type=non_negative_float, default=None,
                   help="add a v-prediction-like loss multiplied by this value")
    g.add_argument("--noise_offset", type=non_negative_float, default=None,
                   help="noise offset (around 0.1 helps very dark/bright images)")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="use a random offset between 0 and --noise_offset each step")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add |latent mean| x this value to --noise_offset per channel")
    g.add_argument("--multires_noise_iterations", type=non_negative_int, default=None,
                   help="multires (pyramid) noise with this many levels (6-10 recommended; 0: off)")
    g.add_argument("--multires_noise_discount", type=unit_float, default=0.3,
                   help="weight decay per multires noise level")
    g.add_argument("--ip_noise_gamma", type=non_negative_float, default=None,
                   help="input perturbation noise strength (around 0.1)")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="use a random strength between 0 and --ip_noise_gamma each step")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule so the last timestep is pure noise (use with --v_parameterization)")
    g.add_argument("--min_timestep", type=non_negative_int, default=None, help="smallest timestep (0-999)")
    g.add_argument("--max_timestep", type=positive_int, default=None, help="largest timestep + 1 (1-1000)")
    g.add_argument("--masked_loss", action="store_true",
                   help="train only where the mask is white: masks from --conditioning_data_dir images or the "
                        "images' alpha channel (--alpha_mask)")


def add_masked_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's mask-image folder for --masked_loss. A separate group because train_controlnet.py
    has a --conditioning_data_dir of its own (conditioning images, not loss masks). The flag joins
    the parser's dataset group when it has one, so forms show it beside the other dataset flags."""
    g = next((grp for grp in parser._action_groups if grp.title == "dataset"), None) \
        or parser.add_argument_group("dataset")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="with --masked_loss: folder of mask images named like the training images (white = "
                        "train, black = ignore)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from library.prompts import SAMPLERS

    g = parser.add_argument_group("sampling")
    g.add_argument("--sample_prompts", type=str, default=None,
                   help="prompt file: .txt (one prompt per line with kohya's --n --w --h --s --l --d --ss "
                        "options), .toml ([[prompt]] tables, or [prompt] with a subset list) or .json (a list)")
    g.add_argument("--sample_every_n_steps", type=positive_int, default=None, help="sample every N steps")
    g.add_argument("--sample_every_n_epochs", type=positive_int, default=None,
                   help="sample every N epochs (then --sample_every_n_steps is ignored, as in kohya)")
    g.add_argument("--sample_at_first", action="store_true", help="sample before training starts")
    g.add_argument("--log_images_every_n_steps", type=positive_int, default=None,
                   help="log the --sample_prompts images (each prompt and a grid of all) to TensorBoard/wandb "
                        "and <output_dir>/sample every N steps: --sample_every_n_steps under Lightning's name")
    g.add_argument("--sample_sampler", type=str, default="ddim", choices=list(SAMPLERS),
                   help="sampler for the sample images (a prompt's --ss overrides it; lms needs scipy)")


def fast_dev_run_steps(value):
    """--fast_dev_run: a bare flag (or true) is 2 steps; a number is that many; 0 or false is off."""
    if isinstance(value, bool):
        return 2 if value else 0
    text = str(value).strip().lower()
    if text in ("true", "yes"):
        return 2
    if text in ("false", "no"):
        return 0
    return non_negative_int(text)


def add_trainer_automation_arguments(parser: argparse.ArgumentParser,
                                     top_k_files: str = "<output_name>-top-step*.safetensors, listed in "
                                                        "<output_name>-top_k.json",
                                     monitor_names: str = "any logged name, e.g. loss/validation (the default with "
                                                          "a validation split), loss/epoch (the default without), "
                                                          "loss/average") -> None:
    """Lightning-style trainer automation handled by library.training.loop (pass
    loop.automation_settings(args) to LoopSettings and use loop.prepare_group for --overfit_batches).
    `top_k_files` and `monitor_names` describe, in the help, where a script keeps its top-k
    checkpoints and which metrics it logs."""
    g = parser.add_argument_group("trainer automation")
    g.add_argument("--save_top_k", type=positive_int, default=None,
                   help=f"keep the K model files with the best --monitor value ({top_k_files}) besides the last one")
    g.add_argument("--monitor", type=str, default=None, help=f"metric for --save_top_k: {monitor_names}")
    g.add_argument("--monitor_mode", type=str, default="min", choices=["min", "max"],
                   help="whether a lower (min) or higher (max) --monitor value is better")
    g.add_argument("--divergence_patience", type=positive_int, default=3,
                   help="stop when this many optimizer steps in a row have a NaN/Inf loss or gradient norm (they "
                        "are skipped; nothing is saved after the divergence, so the last good files stay)")
    g.add_argument("--overfit_batches", type=positive_int, default=None,
                   help="debugging: train on the first N batches only, the same ones every epoch")
    g.add_argument("--fast_dev_run", type=fast_dev_run_steps, default=0, nargs="?", const=2,
                   help="debugging: train N steps (2 for the bare flag) and validate N batches, writing nothing "
                        "(no model, state, samples or logs)")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--validation_split", "--val_split", type=unit_float, default=0.0,
                   help="share of the training images held out for a validation loss (0 = none); the same "
                        "images for the same --validation_seed (Lightning's --val_split works too)")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split and of its fixed noise (default: --seed)")
    g.add_argument("--validate_every_n_steps", type=positive_int, default=None,
                   help="validate every N steps (default: at the end of every epoch)")
    g.add_argument("--validate_every_n_epochs", type=positive_int, default=None, help="validate every N epochs")
    g.add_argument("--max_validation_steps", type=positive_int, default=None,
                   help="at most this many validation batches per validation")


# --- parsing with --config_file -----------------------------------------------------------------

def _flatten(table: dict, prefix: str = "") -> dict[str, tuple[object, str]]:
    """TOML sections are only for grouping: {'a': {'b': 1}} -> {'b': (1, 'a')}."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[key] = (value, prefix.rstrip(".") or "top level")
    return flat


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


PRESET_TABLE = "preset"  # reserved for the GUI's preset metadata, ignored by the scripts


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a TOML of flag names -> values; an unknown key is an error that names it."""
    import toml

    path = Path(path)
    if not path.is_file():
        raise UserError("the --config_file does not exist.", path=path,
                        fix="pass the path of a TOML file of arguments, or write one with --output_config.")
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
        try:  # TOML 1.0 (what --output_config writes: the toml package misreads some escapes, e.g. \\u)
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError:  # kohya reads with the toml package, which takes a few other files
            table = toml.loads(text)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"the --config_file {path} is not valid TOML ({err}).", path=path,
                        fix="correct the line named above; values are written like key = \"text\" or key = 1.5.") from None
    # The GUI keeps its own bookkeeping (preset version, unknown keys) in one [preset] table; it is
    # not a group of flags, so it is skipped rather than flattened.
    if isinstance(table.get(PRESET_TABLE), dict):
        table.pop(PRESET_TABLE)
    actions = _dests(parser)
    values = {}
    for key, (value, section) in _flatten(table).items():
        if key in ("config_file", "output_config"):
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown key '{key}' (in {section}) in the config file {path}.{hint}",
                            path=path, fix="remove the key or correct its name; keys are the flag names "
                                           "without '--'.")
        values[key] = value
    return values


def _check_value(action: argparse.Action, value, source: str):
    """Apply the action's type and choices to a value that came from a config file."""
    if value is None:
        return None
    # flags first: their nargs is 0, which would otherwise read as a list
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"'{action.dest}' in {source} must be true or false, got {value!r}.",
                            fix=f"write {action.dest} = true or {action.dest} = false.")
        return value
    if action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 0):
        items = value if isinstance(value, list) else [value]
        return [_check_value(_Single(action), v, source) for v in items]
    if action.type is not None:
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise UserError(f"bad value for '{action.dest}' in {source}: {err}.",
                            fix=f"correct {action.dest} in that file.") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"bad value {value!r} for '{action.dest}' in {source}.",
                        fix=f"use one of: {', '.join(map(str, action.choices))}.")
    return value


class _Single:
    """View of a list-valued action as a single-valued one, for per-item checks."""

    def __init__(self, action):
        self.dest, self.type, self.choices, self.nargs = action.dest, action.type, action.choices, None


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv, with --config_file values as defaults that the command line overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        actions = _dests(parser)
        values = read_config_file(parser, args.config_file)
        checked = {k: _check_value(actions[k], v, f"the config file {args.config_file}") for k, v in values.items()}
        # the config values are defaults for this parse only: the parser may be parsed again
        # (the GUI checks one shared parser many times), and must not keep the old file's values
        saved = {a.dest: a.default for a in parser._actions}, dict(parser._defaults)
        parser.set_defaults(**checked)
        try:
            args = parser.parse_args(argv)
        finally:
            for action in parser._actions:
                action.default = saved[0][action.dest]
            parser._defaults.clear()
            parser._defaults.update(saved[1])
    if getattr(args, "caption_extention", None):  # kohya's old misspelling still works
        args.caption_extension = args.caption_extention
    if args.output_config:
        write_config_file(parser, args)
        raise SystemExit(0)
    return args


def config_dict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The arguments that differ from the parser's defaults, TOML-ready."""
    out = {}
    for dest, action in _dests(parser).items():
        if dest in ("config_file", "output_config", "debug") or action.help == argparse.SUPPRESS:
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value)) if dest == "resolution" else list(value)
        out[dest] = value
    return out


def write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    from library import toml_writer
    from library.fileio import write_text_atomic

    if not args.config_file:
        raise UserError("--output_config needs --config_file, the path of the TOML to write.",
                        fix="add --config_file my_settings.toml.")
    path = Path(args.config_file)
    write_text_atomic(path, toml_writer.dumps(config_dict(parser, args)))
    print(f"wrote the arguments to {path}")
    return path


def parse_kv_list(items, flag: str) -> dict:
    """["conv_dim=4", "betas=0.9,0.999"] -> {"conv_dim": 4, "betas": (0.9, 0.999)} (kohya's format)."""
    import ast

    out = {}
    for item in items or []:
        for part in str(item).split():
            if "=" not in part:
                raise UserError(f"{flag} expects key=value items, got {part!r}.",
                                fix=f'write e.g. {flag} "key=value".')
            key, raw = part.split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            out[key.strip()] = value
    return out

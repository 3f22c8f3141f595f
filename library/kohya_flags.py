"""Names of kohya's options, for reading kohya files and commands leniently.

`TRAIN_NETWORK_FLAGS` are the flags of kohya sd-scripts' train_network.py (its setup_parser, 193 flags at
sd-scripts commit 48d368f, Feb 2026); `KOHYA_SS_KEYS` are the further keys the kohya_ss GUI writes into the
--config_file it hands to the scripts (kohya_gui/lora_gui.py, for its SDXL/SD3/Flux/... models and its own
bookkeeping such as `epoch` and `noise_offset_type`). A config key in either set that a script does not
define is a kohya option it does not use: it is ignored and listed once. Any other unknown key may be a
typo of one of ours and gets a "did you mean".
"""
from __future__ import annotations

TRAIN_NETWORK_FLAGS = frozenset("""
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier bucket_no_upscale
    bucket_reso_steps cache_info cache_latents cache_latents_to_disk caption_dropout_every_n_epochs
    caption_dropout_rate caption_extension caption_extention caption_prefix caption_separator caption_suffix
    caption_tag_dropout_rate clip_skip color_aug conditioning_data_dir config_file console_log_file
    console_log_level console_log_simple cpu_offload_checkpointing dataset_class dataset_config
    dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout debiased_estimation_loss
    debug_dataset deepspeed dim_from_weights dynamo_backend enable_bucket enable_wildcard face_crop_aug_range
    flip_aug fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16 fused_backward_pass
    gradient_accumulation_steps gradient_checkpointing highvram huber_c huber_scale huber_schedule
    huggingface_path_in_repo huggingface_repo_id huggingface_repo_type huggingface_repo_visibility
    huggingface_token in_json initial_epoch initial_step ip_noise_gamma ip_noise_gamma_random_strength
    keep_tokens keep_tokens_separator learning_rate log_config log_prefix log_tracker_config log_tracker_name
    log_with logging_dir loss_type lowram lr_decay_steps lr_scheduler lr_scheduler_args
    lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale
    lr_scheduler_type lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers max_grad_norm
    max_timestep max_token_length max_train_epochs max_train_steps max_validation_steps mem_eff_attn
    metadata_author metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from
    metadata_preprocessor metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase
    metadata_usage_hint min_bucket_reso min_snr_gamma min_timestep mixed_precision multires_noise_discount
    multires_noise_iterations network_alpha network_args network_dim network_dropout network_module
    network_train_text_encoder_only network_train_unet_only network_weights no_half_vae no_metadata
    noise_offset noise_offset_random_strength offload_optimizer_device offload_optimizer_nvme_path
    offload_param_device offload_param_nvme_path optimizer_args optimizer_type output_config output_dir
    output_name persistent_data_loader_workers pretrained_model_name_or_path prior_loss_weight random_crop
    reg_data_dir resize_interpolation resolution resume resume_from_huggingface sample_at_first
    sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs
    save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state
    save_model_as save_n_epoch_ratio save_precision save_state save_state_on_train_end
    save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa secondary_separator
    seed shuffle_caption skip_cache_check skip_until_initial_step text_encoder_lr token_warmup_min
    token_warmup_step tokenizer_cache_dir torch_compile train_batch_size train_data_dir training_comment
    unet_lr use_8bit_adam use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size
    validate_every_n_epochs validate_every_n_steps validation_seed validation_split wandb_api_key
    wandb_run_name weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
    zero_terminal_snr
""".split())

KOHYA_SS_KEYS = frozenset("""
    ae apply_t5_attn_mask attn_mode blocks_to_swap byt5 cache_text_encoder_outputs
    cache_text_encoder_outputs_to_disk clip_g clip_g_dropout_rate clip_l clip_l_dropout_rate compile
    compile_backend compile_cache_size_limit compile_dynamic compile_fullgraph compile_mode
    disable_mmap_load_safetensors discrete_flow_shift double_blocks_to_swap enable_scaled_pos_embed epoch
    fp8_scaled fp8_vl gemma2 gemma2_max_token_length guidance_scale llm_adapter_path logit_mean logit_std
    mem_eff_save mode_scale model_prediction_type model_type noise_offset_type pos_emb_random_crop_rate qwen3
    qwen3_max_token_length qwen_image_vae_2d save_clip save_t5xxl show_timesteps show_timesteps_resolution
    sigmoid_scale single_blocks_to_swap split_attn split_mode stop_text_encoder_training system_prompt
    t5_dropout_rate t5_max_token_length t5_tokenizer_path t5xxl t5xxl_device t5xxl_dtype
    t5xxl_max_token_length text_encoder text_encoder_batch_size text_encoder_cpu timestep_sampling
    train_inpainting unsloth_offload_checkpointing use_flash_attn use_sage_attn vae_chunk_size
    vae_disable_cache weighting_scheme
""".split())

KOHYA_KEYS = TRAIN_NETWORK_FLAGS | KOHYA_SS_KEYS

"""SDXL base: the second model family (issue 17), as self-contained parts for the family seam.

Usage sketch:

    from library.models.sdxl.loading import load_sdxl_model
    from library.models.sdxl.conditioning import encode_prompts, size_ids
    from library.models.sdxl.lora_names import lora_module_name

    model = load_sdxl_model("sd_xl_base_1.0.safetensors")   # or a diffusers folder; vae_path=--vae
    cond = encode_prompts(model.tokenizers, model.text_encoders, ["a photo of a cat"])
    time_ids = size_ids([(1024, 1024)], [(0, 0)], [(1024, 1024)])
    noise_pred = model.unet(latents, t, cond.hidden_states,
                            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
    lora_module_name("lora_unet", "down_blocks.1.attentions.0.proj_in")  # "lora_unet_input_blocks_4_1_proj_in"

Module map:
    arch.py          shipped configs (configs/sdxl), configs inferred from shapes, family detection
    convert.py       original single-file layout <-> diffusers/transformers keys (both ways)
    loading.py       load_sdxl_model: single files and diffusers folders, --vae, clear errors
    saving.py        save_sdxl_checkpoint (original layout) / save_sdxl_diffusers
    tiny.py          the tiny SDXL-structured model for tests (both layouts)
    conditioning.py  both encoders' penultimate states, bigG's pooled output, size/crop ids, long prompts
    lora_names.py    kohya's SDXL LoRA names (lora_unet_input_blocks_..., lora_te1_, lora_te2_), block index
                     (no import of networks/: networks.lora imports this)
    metadata.py      the SDXL values of a LoRA file's ss_* / modelspec metadata

networks.lora builds SDXL networks with these names when given an SDXL UNet and [te1, te2].
"""

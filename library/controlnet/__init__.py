"""ControlNet training for Stable Diffusion 1.x (train_controlnet.py, train_full_pipeline.py,
inference_controlnet.py, infer.py).

Modules: cli (train_controlnet.py's parser and main), radar (targets -> heatmaps, axis convention), conditioning (condition types; the extension
point for new ones), data (conditioning datasets on top of library.data), weighting (heatmap-weighted
loss), model (ControlNet build/load/save, single-file layout), lora_io (the LoRA's PEFT copy),
evaluation (deterministic validation loss), early_stopping, outputs (files of a stage), trainer
(one stage on library.training.loop), stages (checks, joint mode), config (YAML/TOML sections),
pipeline (stage 1 then stage 2), inference (ControlNet pipeline, conditions, overlays), coco (COCO
instance annotations -> inpainting entries), inpaint (the inpainting condition, masks, compositing).
"""

#!/usr/bin/env python
"""Train a ControlNet for Stable Diffusion 1.x, a UNet LoRA on a frozen ControlNet, or both (joint).

    python train_controlnet.py --pretrained_model_name_or_path model.safetensors --train_data_dir data \
        --conditioning_data_dir cond --output_dir out --learning_rate 1e-5            # a ControlNet
    python train_controlnet.py ... --train_listing radar_data/metadata.jsonl --conditioning_type radar_heatmap \
        --range_max 200 --vel_max 40 --heatmap_sigma 8 --loss_weight_factor 30        # radar heatmaps
    python train_controlnet.py ... --train_unet_lora --controlnet_path out/controlnet --lora_rank 16
    python train_controlnet.py ... --joint --lora_learning_rate 5e-5 --stage2_loss_weight_factor 60
    python train_controlnet.py ... --image_dir coco/train2017 --ann_file coco/annotations/instances_train2017.json \
        --conditioning_type inpaint --mask_dilation 4 --min_mask_area 256         # inpainting from COCO
    python train_controlnet.py --config config.yaml                                    # the radar recipe's YAML

Every option can also come from a TOML file of flag names, or from the radar recipe's sections
(project / model / data / training / controlnet / early_stopping / stage1 / stage2) in TOML or YAML.
"""
from __future__ import annotations

import sys

from library.controlnet.cli import (ALIASES, RADAR_AXES_HELP, REFUSED, main, normalise_argv,  # noqa: F401
                                    refuse_unsupported, setup_parser)
from library.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))

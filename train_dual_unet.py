#!/usr/bin/env python
"""Paired two-modality generation: two UNets over one frozen base, one LoRA each, trained together.

    python train_dual_unet.py --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors \
        --data_dir retina --output_dir results --name 260224_dual_unet_v27 --max_steps 15000 \
        --unet_lora_rank 16 --unet_lora_alpha 16 --hf_lambda 0.5 --struct_lambda 0.3 --offset_noise_strength 0.1

`retina/cf/0001.png` and `retina/fa/0001.png` are one registered pair (--modalities names the
folders). Each modality gets its own noise and timestep; the structure loss ties the two UNets'
predicted x0 latents together. Then `gen_pairs.py --checkpoint_dir results/<name>/best_checkpoint`
generates pairs from shared initial noise. Every option can also come from --config_file (TOML).
"""
from __future__ import annotations

import sys

from library.dual_unet.cli import main, setup_parser  # noqa: F401
from library.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""gen_pairs.py under the name the original CF/FA dual-UNet scripts used (same flags): generate pairs
from a train_dual_unet.py checkpoint.

    python test_gen.py --checkpoint_dir results/<name>/best_checkpoint --num_samples 10 --steps 50 --seed 42
"""
import sys

from gen_pairs import main
from library.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""`make demo`: build the tiny demo model and a small dataset if missing, train a LoRA, say where it is.

Everything is offline and runs on a CPU in a few minutes. The command it runs is the same
kohya-style command users run on real models; only the model path and sizes differ.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO = REPO / "demo"
MODEL_DIR = DEMO / "models"
DATA_DIR = DEMO / "lora_train_set"
OUT_DIR = DEMO / "lora_output"
LOG_DIR = DEMO / "training_logs" / "logs"


def make_dataset(root: Path, count: int = 8, size: int = 256) -> None:
    """Coloured disks on plain backgrounds, captioned; kohya layout: <repeats>_<name>/image + .txt."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = root / "10_sks disk"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        bg = tuple(int(v) for v in rng.integers(30, 90, 3))
        img = Image.new("RGB", (size, size), bg)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(230, 40, 200))
        img.save(folder / f"disk_{i:03d}.png")
        (folder / f"disk_{i:03d}.txt").write_text("a sks disk, magenta, plain background\n", encoding="utf-8")


def main() -> int:
    from library.models.tiny import write_tiny_model

    model = MODEL_DIR / "tiny-sd15.safetensors"
    if not model.exists():
        print(f"building the tiny demo model in {MODEL_DIR}")
        model = write_tiny_model(MODEL_DIR, seed=0).single_file
    if not DATA_DIR.exists():
        print(f"writing the demo dataset to {DATA_DIR}")
        make_dataset(DATA_DIR)
    prompts = DEMO / "sample_prompts.txt"
    prompts.write_text("a sks disk, magenta, plain background --w 256 --h 256 --s 20 --l 4 --d 1\n")

    cmd = [sys.executable, str(REPO / "train_network.py"),
           f"--pretrained_model_name_or_path={model}", f"--train_data_dir={DATA_DIR}",
           f"--output_dir={OUT_DIR}", f"--logging_dir={LOG_DIR}", "--resolution=256,256",
           "--network_module=networks.lora", "--network_dim=8", "--network_alpha=8", "--train_batch_size=2",
           "--max_train_steps=60", "--mixed_precision=no", "--cache_latents", "--learning_rate=1e-3",
           "--save_every_n_epochs=2", "--save_model_as=safetensors", "--save_state", "--log_with=tensorboard",
           "--output_name=demo_lora", "--seed=42", f"--sample_prompts={prompts}",
           "--sample_every_n_epochs=2", "--sample_at_first", "--sample_sampler=ddim"]
    print("running:\n  " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if rc != 0:
        return rc
    lora = OUT_DIR / "demo_lora.safetensors"
    print(f"""
demo finished in {time.time() - start:.0f} s
  LoRA file      {lora}
  sample images  {OUT_DIR / 'sample'}
  TensorBoard    tensorboard --logdir {LOG_DIR}
  resume state   {OUT_DIR / 'demo_lora-state'}

Use the file:
  AUTOMATIC1111 WebUI: copy it to models/Lora/ and write <lora:demo_lora:1> in the prompt.
  ComfyUI: copy it to models/loras/ and add a "Load LoRA" node.
  diffusers: pipe.load_lora_weights("{lora}")
(The demo model has random weights, so its images are noise-like; train on your own checkpoint for real use.)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())

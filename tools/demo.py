#!/usr/bin/env python
"""`make demo`: teach the toy-world base a new concept with a LoRA, and show it off and on.

1. The toy base (library/toy): a tiny SD1.5-structured model pretrained offline on red, blue and
   yellow circles and squares. Built once (minutes) into .cache/toy/, copied to demo/models/.
2. A LoRA dataset of a concept the base never drew: "a sks circle" = a green circle.
3. train_network.py with a kohya-style command (printed), on the CPU.
4. The same seeds sampled with the LoRA at multiplier 0 and 1, side by side in one PNG.

The toy VAE decodes every latent pixel into a flat 8x8 block, so the model's own samples are 8x8
mosaics. lora_off_vs_on.png draws them for display with the shapes' edges smooth
(library/toy/preview.display_blocks); lora_off_vs_on_raw.png shows the mosaics themselves. The
printed green statistics are measured on the model's own (raw) samples.
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
NAME = "demo_lora"
SEEDS = range(8)
PROMPT = "a sks circle"
GUIDANCE = 3.0  # the toy base follows its colour words reliably with a little CFG


def train_command(model: Path, prompts: Path) -> list[str]:
    return [sys.executable, str(REPO / "train_network.py"),
            f"--pretrained_model_name_or_path={model}", f"--train_data_dir={DATA_DIR}",
            f"--output_dir={OUT_DIR}", f"--logging_dir={LOG_DIR}", "--resolution=64,64",
            "--network_module=networks.lora", "--network_dim=8", "--network_alpha=8", "--train_batch_size=8",
            "--max_train_steps=200", "--mixed_precision=no", "--cache_latents", "--learning_rate=1e-3",
            "--caption_extension=.txt", "--save_every_n_epochs=5", "--save_model_as=safetensors", "--save_state",
            "--log_with=tensorboard", f"--output_name={NAME}", "--seed=42", f"--sample_prompts={prompts}",
            "--sample_every_n_epochs=5", "--sample_at_first", "--sample_sampler=ddim"]


def side_by_side(model: Path, lora: Path, out: Path, raw_out: Path) -> dict:
    """Rows: the training images, then each prompt with the LoRA off and on (same seeds); `out`
    drawn by display_blocks, `raw_out` as the model drew them. Statistics on the raw samples."""
    import numpy as np
    import torch

    from library.toy import metrics, world
    from library.toy.preview import apply_lora, display_blocks, generate, make_pipeline
    from library.toy.preview import side_by_side as write_grid

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    pipe = make_pipeline(model)
    network = apply_lora(pipe, lora)
    images, _ = world.new_concept_images(len(SEEDS), seed=1000)  # the dataset's first images
    # the toy VAE decodes 8x8 blocks: the picture draws their shapes' edges smooth (display_blocks);
    # the training images are drawn from the same 8x8 block colours, so both rows look alike
    shown = lambda batch: np.stack([display_blocks(im) for im in batch])  # noqa: E731
    raw = [("training images: a sks circle", images.astype("float32") / 255)]
    stats = {}
    for prompt in (PROMPT, "a red circle"):
        for multiplier in (0.0, 1.0):
            network.set_multiplier(multiplier)
            samples = generate(pipe, prompt, SEEDS, guidance=GUIDANCE)
            raw.append((f"{prompt}  LoRA x{multiplier:g}", samples))
            stats[(prompt, multiplier)] = metrics.colour_excess(samples, "green")
    write_grid([(label, shown(batch)) for label, batch in raw], out, scale=1,
               title=f"every image drawn from its 8x8 block colours with smooth edges, for display (the model's "
                     f"raw output: {raw_out.name})")
    write_grid(raw, raw_out, title="the model's raw samples: the toy VAE decodes each latent pixel as an 8x8 block")
    return stats


def main() -> int:
    from library.toy.build import ToyModelPaths, copy_toy_model, default_threads, ensure_toy_model
    from library.toy.world import write_lora_dataset

    default_threads()
    start = time.time()
    models = ToyModelPaths.at(MODEL_DIR)
    if not models.complete():
        print(f"toy-world base model -> {MODEL_DIR}")
        models = copy_toy_model(ensure_toy_model(log=print), MODEL_DIR)
    if not DATA_DIR.exists():
        print(f"writing the LoRA dataset ('{PROMPT}' = green circles) to {DATA_DIR}")
        write_lora_dataset(DATA_DIR, count=16, repeats=10)
    prompts = DEMO / "sample_prompts.txt"
    prompts.write_text(f"{PROMPT} --w 64 --h 64 --s 20 --l {GUIDANCE:g} --d 1\n", encoding="utf-8")

    cmd = train_command(models.single_file, prompts)
    print("running:\n  " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        return rc
    lora = OUT_DIR / f"{NAME}.safetensors"
    grid, raw_grid = DEMO / "lora_off_vs_on.png", DEMO / "lora_off_vs_on_raw.png"
    stats = side_by_side(models.single_file, lora, grid, raw_grid)

    def green(prompt: str) -> str:
        return f"LoRA off {stats[(prompt, 0.0)]:.3f}, on {stats[(prompt, 1.0)]:.3f}"

    print(f"""
demo finished in {time.time() - start:.0f} s
  base model     {models.single_file}  (diffusers folder: {models.diffusers_dir})
  LoRA file      {lora}
  off vs on      {grid}
                 rows: training images, then the same seeds with the LoRA at 0 and 1
                 (the toy VAE decodes 8x8-pixel blocks; the picture draws the shapes' edges smooth;
                 the raw blocks: {raw_grid})
  green in '{PROMPT}' raw samples: {green(PROMPT)}
  green in 'a red circle' raw samples: {green('a red circle')}
  samples during training  {OUT_DIR / 'sample'}
  TensorBoard    tensorboard --logdir {LOG_DIR}
  resume state   {OUT_DIR / (NAME + '-state')}

Use the file:
  AUTOMATIC1111 WebUI: copy it to models/Lora/ and write <lora:{NAME}:1> in the prompt.
  ComfyUI: copy it to models/loras/ and add a "Load LoRA" node.
  diffusers: pipe = StableDiffusionPipeline.from_pretrained("{models.diffusers_dir}")
             pipe.load_lora_weights("{lora}")
(The toy base draws 64x64 coloured shapes; on a real SD1.5 checkpoint the same command trains a real LoRA.)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())

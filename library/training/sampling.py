"""Sample images during training from a prompt file in kohya's formats (see library.prompts).

Images go to `<output_dir>/sample/` (kohya's names) and to the trackers: TensorBoard as images
`sample/NN` and, with several prompts, all of them in one grid `sample/grid`; wandb as `sample_NN`. Each prompt may name its own sampler (`--ss`). Sampling never
disturbs the training RNG, so a run with samples resumes exactly like one without.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# The prompt format and the sampler map live in library.prompts (gen_img.py uses them too);
# read_prompt_file here adds the size check for the trainers.
from library.errors import UserError
from library.prompts import SamplePrompt, make_scheduler  # noqa: F401
from library.prompts import read_prompt_file as _read_prompt_file

# Peak memory of one sample is the VAE decoder at full resolution: its last blocks hold 128 fp32
# channels per pixel, at least three such tensors alive at once: 1.5 KB per pixel is a lower bound,
# so a size refused here cannot work (65536 x 65536 needs 6 TB), and no workable size is refused.
SAMPLE_BYTES_PER_PIXEL = 1536
MIN_SAMPLE_SIZE = 8  # one latent pixel; library.prompts rounds sizes down to multiples of 8


def available_memory(device=None) -> int:
    """Free bytes where the samples are generated: the GPU's free memory, else the system's."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_sample_sizes(prompts: list[SamplePrompt], path, flag: str = "--sample_prompts", device=None,
                       available: int | None = None) -> None:
    """Refuse, before training, sample sizes the model cannot take (below one latent pixel) or the
    memory cannot hold (SAMPLE_BYTES_PER_PIXEL against available_memory)."""
    from library.fileio import format_bytes

    for i, p in enumerate(prompts, 1):
        where = f"prompt {i} of {path} ({p.width} x {p.height})"
        if min(p.width, p.height) < MIN_SAMPLE_SIZE:
            raise UserError(f"{where}: a sample must be at least {MIN_SAMPLE_SIZE} pixels wide and high.",
                            path=path, fix="set --w and --h to e.g. 512 (multiples of 8).")
        need = p.width * p.height * SAMPLE_BYTES_PER_PIXEL
        free = available_memory(device) if available is None else available
        if need > free:
            raise UserError(f"{where}: generating it needs about {format_bytes(need)} of memory, and "
                            f"{format_bytes(free)} are available; it would be killed mid-run.", path=path,
                            fix="use a smaller --w / --h (e.g. the training resolution).")


def read_prompt_file(path, default_size=(512, 512), flag: str = "--sample_prompts", **defaults) -> list[SamplePrompt]:
    """library.prompts.read_prompt_file, and every prompt's size checked (check_sample_sizes)."""
    prompts = _read_prompt_file(path, default_size, flag=flag, **defaults)
    check_sample_sizes(prompts, path, flag)
    return prompts


class KeepRng:
    """Save and restore the global RNGs around sampling."""

    def __enter__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __exit__(self, *exc):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@torch.no_grad()
def generate_samples(*, unet, vae, text_encoder, tokenizer, base_scheduler, prompts: list[SamplePrompt],
                     sampler: str, out_dir: Path, name_prefix: str, device, dtype=torch.float32,
                     clip_skip: int | None = None, tracker=None, trackers=(), step: int = 0) -> list[Path]:
    """Write one PNG per prompt and log it to `trackers` (accelerate trackers; `tracker` is the
    older single-TensorBoard-tracker form).

    As kohya's sample_image_inference: a prompt without --d gets a random seed (in the file name),
    and prompts are read with A1111 weights, (tag:1.2), and up to 3 x 75 tokens (library.models.prompt_weights).
    """
    import random

    from library.logs import warn_once
    from library.models.prompt_weights import weighted_embeddings
    from diffusers import StableDiffusionPipeline

    trackers = list(trackers) + ([tracker] if tracker is not None else [])
    schedulers = {}  # one scheduler object per sampler name used in this call

    def scheduler_for(name: str):
        if name not in schedulers:
            schedulers[name] = make_scheduler(name, base_scheduler)
        return schedulers[name]

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler_for(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    written, images = [], []
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    with KeepRng():
        for i, p in enumerate(prompts):
            # a random seed that does not draw from (or disturb) the training RNGs
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**31)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            pipe.scheduler = scheduler_for(p.sampler or sampler)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                # Our own text path (clip_skip included): diffusers' clip_skip needs the pre-5
                # transformers layout, and this way samples see exactly what training sees.
                cond, uncond = weighted_embeddings(tokenizer, text_encoder, [p.prompt], [p.negative or ""],
                                                   clip_skip, max_chunks=3, device=device, warn=warn_once)
                image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.scale,
                             generator=generator).images[0]
            path = out_dir / f"{name_prefix}_{i:02d}_{stamp}_{seed}.png"
            from library.fileio import atomic_path

            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
            images.append(image)
            log_sample_image(trackers, i, image, step, p.prompt)
    if len(images) > 1:
        log_sample_grid(trackers, images, step)
    if was_training:
        unet.train()
    return written


def log_sample_image(trackers, index: int, image, step: int, caption: str = "", tag: str | None = None) -> None:
    """One sample image to each tracker that takes images (TensorBoard, wandb); `tag` names it
    instead of sample/NN (TensorBoard) and sample_NN (wandb)."""
    import numpy as np

    for tracker in trackers:
        name = getattr(tracker, "name", "")
        if name == "tensorboard":
            tracker.writer.add_image(tag or f"sample/{index:02d}", np.asarray(image), step, dataformats="HWC")
        elif name == "wandb":
            import wandb

            # kohya's key; commit=False keeps it on the step of the losses logged just before
            tracker.log({tag or f"sample_{index:02d}": wandb.Image(image, caption=caption)}, step=step,
                        commit=False)


def image_grid(images) -> "np.ndarray":
    """The images in rows of ceil(sqrt(n)), each in a cell of the largest size (black around smaller ones)."""
    import math

    import numpy as np

    arrays = [np.asarray(image.convert("RGB")) for image in images]
    cell_h, cell_w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    cols = math.ceil(math.sqrt(len(arrays)))
    rows = math.ceil(len(arrays) / cols)
    grid = np.zeros((rows * cell_h, cols * cell_w, 3), np.uint8)
    for i, a in enumerate(arrays):
        top, left = (i // cols) * cell_h, (i % cols) * cell_w
        grid[top:top + a.shape[0], left:left + a.shape[1]] = a
    return grid


def log_sample_grid(trackers, images, step: int) -> None:
    """All of one sampling's images as one TensorBoard image, `sample/grid`."""
    tensorboards = [t for t in trackers if getattr(t, "name", "") == "tensorboard"]
    if tensorboards:
        grid = image_grid(images)
        for tracker in tensorboards:
            tracker.writer.add_image("sample/grid", grid, step, dataformats="HWC")

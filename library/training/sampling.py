"""Sample images during training from a prompt file in kohya's format.

Each line: `a prompt --n negative words --w 512 --h 512 --s 20 --l 7.5 --d 42` (width, height,
steps, CFG scale, seed). Lines starting with # are comments. Sampling never disturbs the training
RNG, so a run with samples resumes exactly like one without.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
}


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    seed: int | None = None


_OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
            "l": ("scale", float), "d": ("seed", int)}


def parse_prompt_line(line: str, default_size: tuple[int, int] = (512, 512)) -> SamplePrompt | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = re.split(r"\s+--(?=[a-z]+\s)", " " + line + " ")
    sample = SamplePrompt(prompt=parts[0].strip(), width=default_size[0], height=default_size[1])
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key in _OPTIONS:
            name, kind = _OPTIONS[key]
            try:
                setattr(sample, name, kind(value.strip()))
            except ValueError:
                raise UserError(f"bad value for --{key} in the sample prompt line {line!r}.",
                                fix=f"--{key} takes a {kind.__name__}.") from None
    sample.width -= sample.width % 8
    sample.height -= sample.height % 8
    return sample


def read_prompt_file(path, default_size=(512, 512)) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError("the --sample_prompts file does not exist.", path=path,
                        fix="pass a text file with one prompt per line.")
    prompts = [p for line in path.read_text(encoding="utf-8").splitlines()
               if (p := parse_prompt_line(line, default_size))]
    if not prompts:
        raise UserError("the --sample_prompts file holds no prompt.", path=path, fix="add one prompt per line.")
    return prompts


def make_scheduler(sampler: str, base_scheduler):
    import diffusers

    class_name, extra = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **extra)


class _KeepRng:
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
                     clip_skip: int | None = None, seed_base: int = 0, tracker=None, step: int = 0) -> list[Path]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(sampler, base_scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    written = []
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    with _KeepRng():
        for i, p in enumerate(prompts):
            seed = p.seed if p.seed is not None else seed_base + i
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                image = pipe(p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.scale, generator=generator,
                             clip_skip=(clip_skip - 1) if clip_skip and clip_skip > 1 else None).images[0]
            path = out_dir / f"{name_prefix}_{i:02d}_{stamp}_{seed}.png"
            from library.fileio import atomic_path

            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
            if tracker is not None:
                import numpy as np

                tracker.writer.add_image(f"sample/{i:02d}", np.asarray(image), step, dataformats="HWC")
    if was_training:
        unet.train()
    return written

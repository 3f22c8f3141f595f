"""Prompt lines in kohya's format and the sampler names, shared by training samples and gen_img.py.

A line: `a prompt --n negative words --w 512 --h 512 --s 20 --l 7.5 --d 42` (negative prompt,
width, height, steps, CFG scale, seed). Lines starting with # are comments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

# kohya's sampler name -> (diffusers scheduler class, its extra config, WebUI's name for infotexts)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "k_lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "k_euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "dpmsolver"),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}, "dpmsingle"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
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


def parse_prompt_line(line: str, default_size: tuple[int, int] = (512, 512), **defaults) -> SamplePrompt | None:
    """One prompt with its inline options; None for blank and comment lines.

    `defaults` sets the other fields (steps, scale, negative, seed) where the line does not.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = re.split(r"\s+--(?=[a-z]+\s)", " " + line + " ")
    sample = SamplePrompt(prompt=parts[0].strip(), width=default_size[0], height=default_size[1], **defaults)
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key in _OPTIONS:
            name, kind = _OPTIONS[key]
            try:
                setattr(sample, name, kind(value.strip()))
            except ValueError:
                raise UserError(f"bad value for --{key} in the prompt line {line!r}.",
                                fix=f"--{key} takes a {kind.__name__}.") from None
    sample.width -= sample.width % 8
    sample.height -= sample.height % 8
    return sample


def read_prompt_file(path, default_size=(512, 512), flag: str = "--sample_prompts", **defaults) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the {flag} file does not exist.", path=path,
                        fix="pass a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"the {flag} file is not UTF-8 text.", path=path,
                        fix="save it as UTF-8 text, one prompt per line.") from None
    prompts = [p for line in text.splitlines() if (p := parse_prompt_line(line, default_size, **defaults))]
    if not prompts:
        raise UserError(f"the {flag} file holds no prompt.", path=path, fix="add one prompt per line.")
    return prompts


def make_scheduler(sampler: str, base_scheduler):
    """The inference scheduler for a sampler name, on the base model's noise schedule."""
    import importlib.util

    import diffusers

    class_name, extra, _ = SAMPLERS[sampler]
    if class_name == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        raise UserError(f"the sampler '{sampler}' needs scipy, which is not installed.",
                        fix="pick another sampler (e.g. euler or ddim), or pip install scipy.")
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **extra)


def webui_sampler_name(sampler: str) -> str:
    return SAMPLERS[sampler][2]

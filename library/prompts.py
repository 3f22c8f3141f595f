"""Prompt files in kohya's formats and the sampler names, shared by training samples and gen_img.py.

.txt, one prompt a line: `a prompt --n negative words --w 512 --h 512 --s 20 --l 7.5 --d 42 --ss euler`
(negative prompt, width, height, steps, CFG scale, seed, sampler), in any case (--W is --w), as kohya.
Lines starting with # are comments. A prompt without --d gets a random seed (kohya's rule), written
into the image's file name. gen_img.py also reads kohya's --t (img2img strength) and --am (one
multiplier per network, comma-separated).

.toml and .json use kohya's keys: prompt, negative_prompt, width, height, sample_steps, scale, seed,
sample_sampler. TOML: `[[prompt]]` tables, one per prompt, or kohya's `[prompt]` table of shared
values with a `[[prompt.subset]]` list (each subset one prompt; its keys win). JSON: a list of such
objects (a string in the list is read like a .txt line).
"""
from __future__ import annotations

import difflib
import json
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
    # diffusers ends plain dpmsolver at sigma_min (its default final sigma of zero is ++ only)
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
                  "dpmsolver"),
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
    sampler: str | None = None  # kohya's --ss / sample_sampler: this prompt's sampler (None: the run's)
    strength: float | None = None  # gen_img's --t: img2img / hires strength of this prompt (None: the run's)
    network_muls: tuple | None = None  # gen_img's --am: one multiplier per --network_weights file


def _multipliers(text: str) -> tuple:
    return tuple(float(v) for v in text.split(",") if v.strip())


_OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
            "l": ("scale", float), "d": ("seed", int), "ss": ("sampler", str),
            "t": ("strength", float), "am": ("network_muls", _multipliers)}
# kohya's .toml/.json keys -> SamplePrompt fields
_KEYS = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height",
         "sample_steps": "steps", "scale": "scale", "seed": "seed", "sample_sampler": "sampler"}
# Keys kohya's other trainers (FLUX, SD3, ControlNet) write into the same files; they mean nothing here.
_IGNORED_KEYS = {"enum", "guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift",
                 "frame_count", "frames"}


def parse_prompt_line(line: str, default_size: tuple[int, int] = (512, 512), *, path=None,
                      **defaults) -> SamplePrompt | None:
    """One prompt with its inline options; None for blank and comment lines.

    `defaults` sets the other fields (steps, scale, negative, seed) where the line does not;
    `path` (the file) is named in errors.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    # kohya's line_to_prompt_dict matches the options case-insensitively (--W 640 is --w 640)
    parts = re.split(r"\s+--(?=[a-zA-Z]+\s)", " " + line + " ")
    sample = SamplePrompt(prompt=parts[0].strip(), width=default_size[0], height=default_size[1], **defaults)
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key = key.lower()
        if key in _OPTIONS:
            name, kind = _OPTIONS[key]
            try:
                setattr(sample, name, kind(value.strip()))
            except ValueError:
                raise UserError(f"bad value for --{key} in the prompt line {line!r}.", path=path,
                                fix=f"--{key} takes a {getattr(kind, '__name__', 'value').strip('_')}.") from None
    return _finish(sample, f"the prompt line {line!r}", path)


def _finish(sample: SamplePrompt, where: str, path=None) -> SamplePrompt:
    """Sizes down to multiples of 8 (the VAE's), steps kept in kohya's 1..1000, sampler checked."""
    sample.width -= sample.width % 8
    sample.height -= sample.height % 8
    if sample.width < 8 or sample.height < 8:
        raise UserError(f"the size {sample.width}x{sample.height} in {where} is too small.", path=path,
                        fix="give width and height of at least 8 (multiples of 8).")
    sample.steps = max(1, min(1000, sample.steps))
    if sample.strength is not None and not 0 < sample.strength <= 1:
        raise UserError(f"the strength {sample.strength} in {where} is outside (0, 1].", path=path,
                        fix="give --t a value above 0 and at most 1 (how much of the image is redrawn).")
    if sample.sampler is not None:
        sample.sampler = check_sampler(sample.sampler, where, path)
    return sample


def prompt_from_dict(entry: dict, where: str, default_size=(512, 512), path=None, **defaults) -> SamplePrompt:
    """One prompt from a kohya .toml/.json object (keys in _KEYS)."""
    sample = SamplePrompt(prompt="", width=default_size[0], height=default_size[1], **defaults)
    for key, value in entry.items():
        if key in _IGNORED_KEYS:
            continue
        if key not in _KEYS:
            close = difflib.get_close_matches(key, list(_KEYS), n=1)
            raise UserError(f"unknown key '{key}' in {where}.", path=path,
                            fix=(f"did you mean '{close[0]}'? " if close else "") +
                                f"Valid keys: {', '.join(_KEYS)}.")
        name = _KEYS[key]
        kind = {"prompt": str, "negative": str, "sampler": str, "scale": float}.get(name, int)
        bad = isinstance(value, bool) or (kind is str and not isinstance(value, str)) or \
            (kind is int and not isinstance(value, int)) or (kind is float and not isinstance(value, (int, float)))
        if value is None and name == "seed":
            bad = False
        if bad:
            what = {str: "a string", int: "a whole number", float: "a number"}[kind]
            raise UserError(f"'{key}' in {where} must be {what}; got {value!r}.", path=path,
                            fix=f"write '{key}' as {what}.")
        setattr(sample, name, kind(value) if value is not None else None)
    if not sample.prompt.strip():
        raise UserError(f"{where} has no 'prompt'.", path=path, fix="add prompt = \"...\" to it.")
    return _finish(sample, where, path)


def _toml_entries(data: dict, path: Path) -> list:
    """kohya's [prompt] + [[prompt.subset]], or [[prompt]] tables."""
    table = data.get("prompt")
    if isinstance(table, list):
        return table
    if isinstance(table, dict):
        shared = {k: v for k, v in table.items() if k != "subset"}
        subsets = table.get("subset")
        if subsets is None:
            return [shared]
        if not isinstance(subsets, list):
            raise UserError(f"'subset' in [prompt] of {path} must be a list of tables [[prompt.subset]].",
                            path=path, fix="write each prompt as a [[prompt.subset]] table.")
        return [{**shared, **sub} if isinstance(sub, dict) else sub for sub in subsets]
    raise UserError(f"the prompt file {path} has no [prompt] table or [[prompt]] tables.", path=path,
                    fix='write each prompt as [[prompt]] with prompt = "..." (kohya\'s [prompt] with '
                        '[[prompt.subset]] works too).')


def _structured_entries(text: str, path: Path) -> list:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"the prompt file {path} is not valid JSON ({err}).", path=path,
                            fix="fix the JSON at that line; the file is a list of prompt objects.") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f"the prompt file {path} must hold a JSON list of prompt objects.", path=path,
                            fix='write [{"prompt": "...", "sample_steps": 20}, ...].')
        return data
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"the prompt file {path} is not valid TOML ({err}).", path=path,
                        fix="fix the TOML at that line.") from None
    return _toml_entries(data, path)


def read_prompt_file(path, default_size=(512, 512), flag: str = "--sample_prompts", **defaults) -> list[SamplePrompt]:
    """Prompts from a .txt, .toml or .json file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the {flag} file does not exist.", path=path,
                        fix="pass a .txt file with one prompt per line, or a .toml / .json prompt file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"the {flag} file is not UTF-8 text.", path=path,
                        fix="save it as UTF-8 text.") from None
    if path.suffix.lower() in (".toml", ".json"):
        prompts = []
        for i, entry in enumerate(_structured_entries(text, path), 1):
            where = f"prompt #{i} of {path}"
            if isinstance(entry, str):
                sample = parse_prompt_line(entry, default_size, path=path, **defaults)
            elif isinstance(entry, dict):
                sample = prompt_from_dict(entry, where, default_size, path, **defaults)
            else:
                raise UserError(f"{where} must be a table/object with a 'prompt' (or a prompt string).", path=path,
                                fix='write it as {"prompt": "...", ...}.')
            if sample is not None:
                prompts.append(sample)
    else:
        prompts = [p for line in text.splitlines()
                   if (p := parse_prompt_line(line, default_size, path=path, **defaults))]
    if not prompts:
        raise UserError(f"the {flag} file holds no prompt.", path=path, fix="add one prompt per line.")
    return prompts


def check_sampler(name: str, where: str = "", path=None) -> str:
    """A known sampler name (lowercased), usable here: lms needs scipy. Raises a UserError otherwise,
    so a bad name stops the run before training rather than at the first sample."""
    import importlib.util

    key = str(name).strip().lower()
    if key not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'" + (f" in {where}" if where else "") + ".", path=path,
                        fix=f"use one of: {', '.join(SAMPLERS)}.")
    if SAMPLERS[key][0] == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        raise UserError(f"the sampler '{key}'" + (f" ({where})" if where else "") +
                        " needs scipy, which is not installed.", path=path,
                        fix="pick another sampler (e.g. euler or ddim), or pip install scipy.")
    return key


def make_scheduler(sampler: str, base_scheduler):
    """The inference scheduler for a sampler name, on the base model's noise schedule."""
    import diffusers

    class_name, extra, _ = SAMPLERS[check_sampler(sampler)]
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **extra)


def webui_sampler_name(sampler: str) -> str:
    return SAMPLERS[sampler][2]

"""Generation with a trained ControlNet (and optionally the stage-2 LoRA) through diffusers' stock
StableDiffusionControlNetPipeline, so the saved files are proven to work where users load them.

The LoRA is loaded with `pipe.load_lora_weights` (the PEFT copy in lora/ or a kohya file) as an
adapter whose weight is --lora_scale; --controlnet_scale is the pipeline's
controlnet_conditioning_scale. Conditions are HxWx3 float arrays in [0, 1]: a radar heatmap drawn
from targets (same axes and sigma as training) or a conditioning image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ADAPTER = "controlnet_lora"


@dataclass
class Job:
    prompt: str
    seed: int
    negative: str = ""
    targets: list = field(default_factory=list)  # radar.Target, for the condition and the overlay
    condition_image: str | None = None
    steps: int | None = None
    cfg: float | None = None


def build_pipeline(model, controlnet, sampler: str = "ddim"):
    from diffusers import StableDiffusionControlNetPipeline

    from library.prompts import make_scheduler

    pipe = StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        controlnet=controlnet, scheduler=make_scheduler(sampler, model.noise_scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora(pipe, path) -> Path:
    """Load a LoRA (folder or file) into the pipeline's UNet as one adapter; returns the file used."""
    from library.controlnet.lora_io import find_lora_file

    file = find_lora_file(path)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    return file


def set_lora_scale(pipe, scale: float) -> None:
    pipe.set_adapters([ADAPTER], adapter_weights=[float(scale)])


@torch.no_grad()
def generate(pipe, prompts: list[str], conditions: list[np.ndarray], seeds: list[int], steps: int = 20,
             cfg: float = 1.0, controlnet_scale: float = 1.0, negatives: list[str] | None = None,
             clip_skip: int | None = None) -> np.ndarray:
    """[N, H, W, 3] float images in [0, 1]; image i from its own seed (batch-size independent)."""
    from library.models.text import encode_captions

    device = pipe.unet.device
    dtype = pipe.unet.dtype
    cond = torch.stack([torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1) for c in conditions]).float()
    embeds = encode_captions(pipe.tokenizer, pipe.text_encoder, prompts, clip_skip, device).to(dtype)
    negative = encode_captions(pipe.tokenizer, pipe.text_encoder, negatives or [""] * len(prompts), clip_skip,
                               device).to(dtype)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, image=cond.to(device, dtype),
               height=cond.shape[2], width=cond.shape[3], num_inference_steps=steps, guidance_scale=cfg,
               controlnet_conditioning_scale=float(controlnet_scale), generator=generators, output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def overlay(image: np.ndarray, points: list[tuple[float, float]], radius: float) -> np.ndarray:
    """The image with a ring of `radius` px around each target point (where the object should be)."""
    import cv2

    canvas = np.ascontiguousarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    for x, y in points:
        centre = (int(round(x)), int(round(y)))
        cv2.circle(canvas, centre, max(2, int(round(radius))), (255, 255, 255), 1, lineType=cv2.LINE_AA)
        cv2.drawMarker(canvas, centre, (255, 0, 255), cv2.MARKER_CROSS, max(3, int(radius // 2)), 1)
    return canvas


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from library.fileio import atomic_path

    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


# --- prompt files ----------------------------------------------------------------------------------

def parse_targets_text(text: str, where: str) -> list:
    """'85,-12 120,5,0.8' (range,velocity[,amplitude] per target) -> radar.Target list."""
    from library.controlnet.radar import parse_targets
    from library.errors import UserError

    items = []
    for part in text.replace(";", " ").split():
        try:
            items.append([float(v) for v in part.split(",")])
        except ValueError:
            raise UserError(f"bad --targets value {part!r} in {where}.",
                            fix="write targets as range,velocity[,amplitude], separated by spaces.") from None
    return parse_targets(items, where)


def read_jobs(path, seed: int, images_per_prompt: int = 1) -> list[Job]:
    """Jobs from a .jsonl ({"text", "targets", "conditioning_image", "seed", "negative"} per line) or a
    text file (`a prompt --targets 85,-12 120,5 --cond cond.png --n negative --d 42 --s 30 --l 4`)."""
    from library.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError("the --prompt_file does not exist.", path=path, fix="pass a .txt or .jsonl prompt file.")
    return jobs_from_text(path.read_text(encoding="utf-8-sig"), path.suffix.lower() == ".jsonl", path.parent,
                          str(path), seed, images_per_prompt)


def jobs_from_text(text: str, is_jsonl: bool, base_dir: Path, source: str, seed: int,
                   images_per_prompt: int = 1) -> list[Job]:
    """Jobs from prompt lines; relative conditioning paths are relative to `base_dir`."""
    import json
    import re

    from library.controlnet.radar import parse_targets
    from library.errors import UserError
    from library.prompts import parse_prompt_line

    path = Path(base_dir)
    base = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"line {n} of {source}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if is_jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where} is not valid JSON ({err}).", path=source, fix="one JSON object per line.") \
                    from None
            cond = obj.get("conditioning_image") or obj.get("conditioning_file_name")
            base.append(Job(str(obj.get("text") or obj.get("prompt") or ""), obj.get("seed"), obj.get("negative", ""),
                            parse_targets(obj.get("targets"), where), str(path / cond) if cond else None))
            continue
        extracted = {}
        for key in ("targets", "cond"):
            match = re.search(rf"\s--{key}\s+(.*?)(?=\s--[a-z]+\s|$)", " " + line)
            if match:
                extracted[key] = match.group(1).strip()
                line = (" " + line).replace(match.group(0), " ").strip()
        p = parse_prompt_line(line)
        cond = extracted.get("cond")
        base.append(Job(p.prompt, p.seed, p.negative, parse_targets_text(extracted.get("targets", ""), where),
                        str(path / cond) if cond else None, p.steps if "--s " in line else None,
                        p.scale if "--l " in line else None))
    if not base:
        raise UserError(f"{source} holds no prompt.", fix="add one prompt per line.")
    jobs = []
    for job in base:
        for k in range(images_per_prompt):
            s = (job.seed + k) if job.seed is not None else seed + len(jobs)
            jobs.append(Job(job.prompt, s, job.negative, job.targets, job.condition_image, job.steps, job.cfg))
    return jobs


def resolve(cli_value, record: dict, config: dict, key: str, default, warn):
    """A setting from the command line, else the ControlNet's training record, else --config, else the
    default. A given value that contradicts the record gets a warning: the ControlNet learned the record's."""
    trained = record.get(key)
    for source, value in ((f"--{key}", cli_value), (f"{key} in --config", config.get(key))):
        if value is not None and trained is not None and float(value) != float(trained):
            warn(f"{source} = {value:g} differs from the {trained:g} the ControlNet was trained with; target "
                 "positions and blob widths will not match what it learned.")
    return next((v for v in (cli_value, trained, config.get(key)) if v is not None), default)

"""Text-to-image for gen_img.py: prompts -> jobs (one per image, each with its seed) -> batches -> PNGs.

Each image's starting noise comes from its own CPU generator seeded with its seed, so an image is
the same whatever the batch size and on CPU or GPU (up to float rounding), and diffusers'
pipeline with that seed reproduces it. PNGs carry WebUI's `parameters` text (PNG Info).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from library.prompts import SamplePrompt, make_scheduler, webui_sampler_name


@dataclass
class Job:
    prompt: SamplePrompt
    seed: int
    index: int  # running number of the image in this run


@dataclass
class AppliedNetwork:
    path: Path
    multiplier: float
    network: object
    short_hash: str | None  # WebUI's LoRA hash (sha256 of the tensor data, 12 digits), for the infotext


def plan_jobs(prompts: list[SamplePrompt], images_per_prompt: int, seed: int | None) -> tuple[list[Job], int]:
    """One job per image. A prompt's `--d S` gives its images S, S+1, ...; the others count up from
    the run's seed (random when not given). Returns (jobs, the run's seed)."""
    base = random.randint(0, 2**31 - 1) if seed is None else seed
    jobs = []
    for p in prompts:
        for k in range(images_per_prompt):
            n = len(jobs)
            jobs.append(Job(p, (p.seed + k) if p.seed is not None else base + n, n))
    return jobs, base


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs that can share a pipeline call (same size, steps, CFG scale, strength and
    network multipliers)."""
    def settings(job):
        p = job.prompt
        return p.width, p.height, p.steps, p.scale, p.strength, p.network_muls

    out: list[list[Job]] = []
    for job in jobs:
        if out and len(out[-1]) < batch_size and settings(job) == settings(out[-1][0]):
            out[-1].append(job)
        else:
            out.append([job])
    return out


def apply_networks(model, module_names: list[str], files: list[str], multipliers: list[float], device,
                   dtype) -> list[AppliedNetwork]:
    """Patch each LoRA into the model at its multiplier; a module the model lacks is an error."""
    from library.lora_tools.model_fit import check_fits, target_layers
    from library.lora_tools.weights import read_lora
    from library.training.network_trainer import import_network_module
    from networks.lora_format import data_section_sha256

    layers = target_layers(model.unet, model.text_encoder)
    applied = []
    for name, path, mul in zip(module_names, files, multipliers):
        lora = read_lora(path)
        check_fits(lora, layers, "--ckpt")
        module = import_network_module(name)
        network, weights = module.create_network_from_weights(mul, str(path), model.vae, model.text_encoder,
                                                              model.unet, weights_sd=lora.state_dict())
        network.apply_to(model.text_encoder, model.unet)
        network.load_state_dict(weights)
        network.to(device, dtype).eval()
        short = data_section_sha256(lora.path)[:12] if lora.path.suffix == ".safetensors" else None
        applied.append(AppliedNetwork(lora.path, mul, network, short))
    return applied


@dataclass
class Control:
    """A ControlNet and its conditioning images (image i of the run uses images[i % len])."""
    path: Path
    images: list[str]
    scale: float
    controlnet: object

    def batch_condition(self, batch: list[Job]) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1], each image resized to its job's size."""
        import numpy as np
        from PIL import Image

        from library.data.probe import load_rgb

        p = batch[0].prompt
        arrays = [np.asarray(load_rgb(self.images[j.index % len(self.images)]).resize((p.width, p.height),
                                                                                    Image.BICUBIC))
                  for j in batch]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class InitImages:
    """kohya gen_img's --image_path (img2img) and --mask_path (inpainting): image i of the run starts from
    images[i % len] (and repaints where masks[i % len] is white), resized to its size."""
    images: list[str]
    masks: list[str]

    def batch_images(self, batch: list[Job], size: tuple[int, int] | None = None) -> tuple[list, list | None]:
        from PIL import Image

        from library.data.probe import load_rgb

        p = batch[0].prompt
        size = size or (p.width, p.height)
        images = [load_rgb(self.images[j.index % len(self.images)]).resize(size, Image.LANCZOS) for j in batch]
        masks = None
        if self.masks:
            masks = [Image.open(self.masks[j.index % len(self.masks)]).convert("L").resize(size, Image.LANCZOS)
                     for j in batch]
        return images, masks


def image_files(path: str, flag: str) -> list[str]:
    """A file, or the images of a folder in name order (kohya: a folder is used image by image)."""
    from library.data.probe import IMAGE_EXTENSIONS
    from library.models.checkpoint_io import check_exists

    p = check_exists(path, "image", flag=flag)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            from library.errors import UserError

            raise UserError(f"the {flag} folder holds no images.", path=p, fix="pass an image file or a folder of images.")
        return files
    return [str(p)]


def load_embeddings(pipe, files: list[str]) -> list[str]:
    """kohya's --textual_inversion_embeddings: each file's vectors become the token named like the
    file (A1111 .pt/.safetensors with string_to_param, kohya's with emb_params), through diffusers'
    load_textual_inversion. Returns the tokens."""
    from library.errors import UserError
    from library.models.checkpoint_io import check_exists

    tokens = []
    for path in files:
        p = check_exists(path, "embedding file", flag="--textual_inversion_embeddings")
        try:
            pipe.load_textual_inversion(str(p), token=p.stem)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"cannot load the embedding {p.name} ({err}).", path=p,
                            fix="pass an SD1.x textual-inversion file (A1111 or kohya format) whose vectors fit "
                                "this model's text encoder.") from None
        tokens.append(p.stem)
    return tokens


def pipeline_for(pipe, kind: str):
    """The txt2img pipeline itself, or diffusers' img2img / inpaint pipeline over the same modules."""
    if kind == "txt2img":
        return pipe
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionImg2ImgPipeline
    other = cls(**{k: v for k, v in pipe.components.items() if k != "image_encoder"}, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


def build_pipeline(model, sampler: str, control: Control | None = None):
    """diffusers' stock pipeline over our loaded components (its ControlNet pipeline with a ControlNet)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    parts = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                 scheduler=make_scheduler(sampler, scheduler_source(model)), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    if control is None:
        pipe = StableDiffusionPipeline(**parts)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=control.controlnet, **parts)
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    return pipe


def scheduler_source(model):
    """What the sampler's config comes from: a diffusers folder's own scheduler_config.json (as
    diffusers' from_pretrained + Scheduler.from_config(pipe.scheduler.config) does, e.g. its
    timestep_spacing), else the SD1.5 schedule the loader made."""
    import json
    from types import SimpleNamespace

    path = Path(model.model_path) / "scheduler" / "scheduler_config.json"
    if path.is_file():  # the loader has already read this JSON, so it parses
        return SimpleNamespace(config=json.loads(path.read_text(encoding="utf-8")))
    return model.noise_scheduler


@torch.no_grad()
def run_batch(pipe, batch: list[Job], clip_skip: int | None = None, control: Control | None = None,
              max_embeddings_multiples: int = 1, init_images: list | None = None, masks: list | None = None,
              strength: float = 0.8, steps: int | None = None, size: tuple[int, int] | None = None):
    """Float images in [0, 1], HWC numpy arrays, one per job.

    The prompts are encoded here with A1111 weights, (tag:1.2), and up to 75 x max_embeddings_multiples
    tokens (library.prompt_weights, kohya's gen_img rules; kohya's clip_skip rule): diffusers' own
    clip_skip reaches for `text_encoder.text_model`, which transformers 5 removed. A prompt without
    weights within 75 tokens is exactly what the pipeline computes from the prompt string.
    """
    from library.logs import warn_once
    from library.prompt_weights import weighted_embeddings

    p = batch[0].prompt
    device = pipe.text_encoder.device
    # textual-inversion tokens with several vectors stand for several tokens (diffusers' rule)
    convert = getattr(pipe, "maybe_convert_prompt", lambda text, tokenizer: text)
    texts = [convert(j.prompt.prompt, pipe.tokenizer) for j in batch]
    negative_texts = [convert(j.prompt.negative, pipe.tokenizer) for j in batch]
    prompts, negatives = weighted_embeddings(pipe.tokenizer, pipe.text_encoder, texts, negative_texts, clip_skip,
                                             max_chunks=max_embeddings_multiples, device=device, warn=warn_once)
    width, height = size or (p.width, p.height)
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
    extra = {}
    if control is not None:
        extra = dict(image=control.batch_condition(batch).to(device, pipe.unet.dtype),
                     controlnet_conditioning_scale=float(control.scale))
    steps = steps or p.steps
    if init_images is not None:  # img2img, or inpainting with masks: diffusers' own pipelines
        extra.update(image=init_images, strength=p.strength if p.strength is not None else strength)
        if masks is not None:
            extra.update(mask_image=masks, width=width, height=height)
        return pipe(prompt_embeds=prompts, negative_prompt_embeds=negatives, num_inference_steps=steps,
                    guidance_scale=p.scale, generator=generators, output_type="np", **extra).images
    return pipe(prompt_embeds=prompts, negative_prompt_embeds=negatives, width=width, height=height,
                num_inference_steps=steps, guidance_scale=p.scale, generator=generators, output_type="np",
                **extra).images


def highres_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """kohya's first-stage size for --highres_fix_scale: int(x * scale + 0.5), down to a multiple of 32."""
    def one(x):
        v = int(x * scale + 0.5)
        return max(32, v - v % 32)

    return one(width), one(height)


def run_highres(pipes: dict, batch: list[Job], scale: float, first_steps: int, strength: float,
                first_strength: float | None, init: InitImages | None, **common):
    """kohya's hires fix: the batch at the smaller size (highres_size) in `first_steps` steps, each image
    enlarged (Lanczos) to the full size, then redrawn by img2img at `strength` in the prompt's steps."""
    from PIL import Image

    p = batch[0].prompt
    small = highres_size(p.width, p.height, scale)
    if init is None:
        first = run_batch(pipes["txt2img"], batch, steps=first_steps, size=small, **common)
    else:
        images, masks = init.batch_images(batch, small)
        first = run_batch(pipes["inpaint" if masks else "img2img"], batch, steps=first_steps, size=small,
                          init_images=images, masks=masks, strength=first_strength or strength, **common)
    enlarged = [Image.fromarray((image * 255).round().clip(0, 255).astype("uint8")).resize((p.width, p.height),
                                                                                            Image.LANCZOS)
                for image in first]
    return run_batch(pipes["img2img"], batch, init_images=enlarged, strength=strength, **common)


def infotext(job: Job, sampler: str, model_name: str, networks: list[AppliedNetwork],
             clip_skip: int | None = None, control: Control | None = None) -> str:
    """WebUI's `parameters` text; the LoRAs appear as <lora:name:mul> so WebUI can redo the image."""
    p = job.prompt
    tags = "".join(f" <lora:{n.path.stem}:{n.multiplier:g}>" for n in networks)
    lines = [p.prompt + tags]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    fields = [f"Steps: {p.steps}", f"Sampler: {webui_sampler_name(sampler)}", f"CFG scale: {p.scale:g}",
              f"Seed: {job.seed}", f"Size: {p.width}x{p.height}", f"Model: {model_name}"]
    if clip_skip and clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    if control is not None:  # as WebUI's ControlNet extension writes it, so PNG Info shows it
        fields.append(f'ControlNet 0: "Model: {control.path.stem}, Weight: {control.scale:g}, '
                      f'Image: {Path(control.images[job.index % len(control.images)]).name}"')
    hashes = [f"{n.path.stem}: {n.short_hash}" for n in networks if n.short_hash]
    if hashes:
        fields.append(f'Lora hashes: "{", ".join(hashes)}"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image, out_dir: Path, stamp: str, job: Job, text: str) -> Path:
    """Write im_<stamp>_<index>_<seed>.png atomically (a new name if that one exists)."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from library.fileio import atomic_path

    name = f"im_{stamp}_{job.index:03d}_{job.seed}"
    path, n = out_dir / f"{name}.png", 0
    while path.exists():
        n += 1
        path = out_dir / f"{name}_{n}.png"
    info = PngInfo()
    info.add_text("parameters", text)
    pixels = (np.clip(image, 0, 1) * 255).round().astype("uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
    return path


def timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S")

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
    """Consecutive jobs that can share a pipeline call (same size, steps and CFG scale)."""
    def settings(job):
        p = job.prompt
        return p.width, p.height, p.steps, p.scale, p.strength, tuple(p.network_muls or ())

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
    from library.lora.network_module import import_network_module
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

    def batch_condition(self, batch: list[Job], size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1], each image resized to `size` (default: its job's size)."""
        import numpy as np
        from PIL import Image

        from library.data.probe import load_rgb

        p = batch[0].prompt
        size = size or (p.width, p.height)
        arrays = [np.asarray(load_rgb(self.images[j.index % len(self.images)]).resize(size, Image.BICUBIC))
                  for j in batch]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class InitImages:
    """img2img / inpainting sources (kohya's --image_path / --mask_path): image i of the run uses
    images[i % len] and masks[i % len], each resized to the size being generated."""
    images: list[str]
    masks: list[str]

    def batch(self, batch: list[Job], size: tuple[int, int]):
        from PIL import Image

        from library.data.probe import load_rgb

        images = [load_rgb(self.images[j.index % len(self.images)]).resize(size, Image.LANCZOS) for j in batch]
        masks = None
        if self.masks:
            # white = repaint, black = keep (WebUI's and diffusers' convention)
            masks = [Image.open(self.masks[j.index % len(self.masks)]).convert("L").resize(size, Image.BICUBIC)
                     for j in batch]
        return images, masks


@dataclass
class HighresFix:
    """kohya's highres fix: a first pass at `scale` x the size (multiples of 32) with `steps` steps,
    upscaled (Lanczos on the image, or bicubic on the latents), then img2img at the full size."""
    scale: float
    steps: int
    strength: float | None  # of the first pass when it is img2img itself; None: the run's
    latents: bool
    save_first: bool

    def first_size(self, width: int, height: int) -> tuple[int, int]:
        def scaled(x):
            x = int(x * self.scale + 0.5)
            return max(32, x - x % 32)
        return scaled(width), scaled(height)


def image_files(path: str, flag: str) -> list[str]:
    """A file, or the images of a folder in name order (kohya: a folder is used image by image)."""
    from library.data.probe import IMAGE_EXTENSIONS
    from library.errors import UserError
    from library.models.checkpoint_io import check_exists

    p = check_exists(path, "image", flag=flag)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"the {flag} folder holds no images.", path=p, fix="pass an image file or a folder of images.")
        return files
    return [str(p)]


def load_embeddings(pipe, files: list[str]) -> list[tuple[str, int]]:
    """Textual-inversion embeddings (A1111 .pt/.safetensors, kohya's, diffusers') into the pipeline's
    tokenizer and text encoder through diffusers; each is named by its file name. Returns
    (token, vectors) per file."""
    from library.errors import UserError

    loaded = []
    for path in map(Path, files):
        vectors = _embedding_vectors(path)
        token = path.stem
        try:
            pipe.load_textual_inversion(vectors, token=token, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        except ValueError as err:
            raise UserError(f"the embedding {path} cannot be used with this model ({err}).", path=path,
                            fix="use an embedding made for this model family (SD1.x: 768 values per vector, "
                                "SD2.x: 1024), whose file name is not already a word of the tokenizer.") from None
        loaded.append((token, vectors.shape[0]))
    return loaded


def _embedding_vectors(path: Path) -> torch.Tensor:
    """[n, dim] from the known embedding formats."""
    from library.errors import UserError

    if not path.is_file():
        raise UserError(f"embedding file not found: {path}.", path=path,
                        fix="check the --textual_inversion_embeddings path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"the embedding {path} cannot be read ({type(err).__name__}: {err}).", path=path,
                        fix="pass an A1111 or kohya textual-inversion file (.pt or .safetensors).") from None
    if isinstance(data, dict) and "string_to_param" in data:       # A1111 .pt
        vectors = data["string_to_param"].get("*")
    elif isinstance(data, dict) and "emb_params" in data:          # A1111 / kohya .safetensors
        vectors = data["emb_params"]
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
        raise UserError(f"{path} is an SDXL embedding (clip_l + clip_g); this gen_img.py generates with SD1.x/2.x.",
                        path=path, fix="use an SD1.x/2.x embedding.")
    elif isinstance(data, dict) and len(data) == 1:                # diffusers learned_embeds
        vectors = next(iter(data.values()))
    elif isinstance(data, torch.Tensor):
        vectors = data
    else:
        vectors = None
    if not isinstance(vectors, torch.Tensor):
        raise UserError(f"{path} holds no textual-inversion vectors (keys: {sorted(data)[:5] if isinstance(data, dict) else type(data).__name__}).",
                        path=path, fix="pass an A1111, kohya or diffusers textual-inversion file.")
    return vectors.reshape(-1, vectors.shape[-1]).float()


def variant(pipe, kind: str):
    """The img2img or inpainting form of a text-to-image pipeline (ControlNet kept), sharing its parts."""
    if kind == "text":
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    cache = pipe.__dict__.setdefault("_sdt_variants", {})
    if kind not in cache:
        auto = AutoPipelineForImage2Image if kind == "image" else AutoPipelineForInpainting
        cache[kind] = auto.from_pipe(pipe)
        cache[kind].set_progress_bar_config(leave=False, desc="denoising")
    return cache[kind]


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
              max_embeddings_multiples: int = 1, *, images=None, masks=None, strength: float | None = None,
              size: tuple[int, int] | None = None, steps: int | None = None, output_type: str = "np"):
    """Float images in [0, 1], HWC numpy arrays, one per job (or what `output_type` asks for).

    With `images` the pipeline is diffusers' img2img form (inpainting with `masks`) at `strength`;
    `size` and `steps` replace the prompt's (the first pass of the highres fix).

    The prompts are encoded here with A1111 weights, (tag:1.2), and up to 75 x max_embeddings_multiples
    tokens (library.models.prompt_weights, kohya's gen_img rules; kohya's clip_skip rule): diffusers' own
    clip_skip reaches for `text_encoder.text_model`, which transformers 5 removed. A prompt without
    weights within 75 tokens is exactly what the pipeline computes from the prompt string.
    """
    from library.logs import warn_once
    from library.models.prompt_weights import weighted_embeddings

    p = batch[0].prompt
    width, height = size or (p.width, p.height)
    device = pipe.text_encoder.device
    # textual-inversion names become their tokens ("emb" -> "emb emb_1 ..."); a no-op without embeddings
    texts = [pipe.maybe_convert_prompt(j.prompt.prompt, pipe.tokenizer) for j in batch]
    negs = [pipe.maybe_convert_prompt(j.prompt.negative, pipe.tokenizer) for j in batch]
    prompts, negatives = weighted_embeddings(pipe.tokenizer, pipe.text_encoder, texts, negs, clip_skip,
                                             max_chunks=max_embeddings_multiples, device=device, warn=warn_once)
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
    extra = {}
    if control is not None:
        cond = control.batch_condition(batch, (width, height)).to(device, pipe.unet.dtype)
        extra = dict(controlnet_conditioning_scale=float(control.scale))
        extra["control_image" if images is not None else "image"] = cond
    if images is not None:
        extra.update(image=images, strength=float(strength))
        if masks is not None:
            extra["mask_image"] = masks
    return pipe(prompt_embeds=prompts, negative_prompt_embeds=negatives, width=width, height=height,
                num_inference_steps=steps or p.steps, guidance_scale=p.scale, generator=generators,
                output_type=output_type, **extra).images


def generate(pipe, batch: list[Job], clip_skip: int | None = None, control: Control | None = None,
             max_embeddings_multiples: int = 1, init: InitImages | None = None, highres: HighresFix | None = None,
             strength: float = 0.8):
    """(final images, first-pass images or None): text-to-image, img2img or inpainting, with the
    highres fix when asked. Strength: the prompt's --t, else the run's `strength` (--strength)."""
    import numpy as np
    from PIL import Image

    p = batch[0].prompt
    common = (clip_skip, control, max_embeddings_multiples)
    strength = p.strength if p.strength is not None else strength
    kind = "text" if init is None else ("inpaint" if init.masks else "image")
    if highres is None:
        images, masks = init.batch(batch, (p.width, p.height)) if init else (None, None)
        return run_batch(variant(pipe, kind), batch, *common, images=images, masks=masks, strength=strength), None
    small = highres.first_size(p.width, p.height)
    images, masks = init.batch(batch, small) if init else (None, None)
    first_strength = highres.strength if highres.strength is not None else strength
    first = run_batch(variant(pipe, kind), batch, *common, images=images, masks=masks, strength=first_strength,
                      size=small, steps=highres.steps, output_type="latent" if highres.latents else "np")
    if highres.latents:  # kohya's --highres_fix_latents_upscaling: bicubic on the latents
        upscaled = torch.nn.functional.interpolate(first.float(), (p.height // 8, p.width // 8), mode="bicubic")
        upscaled = upscaled.to(first.dtype)
        first_images = None
    else:
        first_images = first
        upscaled = [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype("uint8")).resize(
            (p.width, p.height), Image.LANCZOS) for a in first]
    masks = init.batch(batch, (p.width, p.height))[1] if init and init.masks else None
    second = run_batch(variant(pipe, "inpaint" if masks else "image"), batch, *common, images=upscaled, masks=masks,
                       strength=strength)
    return second, first_images


def infotext(job: Job, sampler: str, model_name: str, networks: list[AppliedNetwork],
             clip_skip: int | None = None, control: Control | None = None, init: InitImages | None = None,
             highres: HighresFix | None = None, strength: float = 0.8) -> str:
    """WebUI's `parameters` text; the LoRAs appear as <lora:name:mul> so WebUI can redo the image."""
    p = job.prompt
    muls = multipliers(job, networks)
    tags = "".join(f" <lora:{n.path.stem}:{m:g}>" for n, m in zip(networks, muls))
    lines = [p.prompt + tags]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    fields = [f"Steps: {p.steps}", f"Sampler: {webui_sampler_name(sampler)}", f"CFG scale: {p.scale:g}",
              f"Seed: {job.seed}", f"Size: {p.width}x{p.height}", f"Model: {model_name}"]
    if clip_skip and clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    if init is not None or highres is not None:  # WebUI's names, so PNG Info and "Send to" read them
        fields.append(f"Denoising strength: {p.strength if p.strength is not None else strength:g}")
    if highres is not None:
        fields.append(f"Hires upscale: {1 / highres.scale:g}, Hires steps: {highres.steps}, Hires upscaler: "
                      + ("Latent (bicubic)" if highres.latents else "Lanczos"))
    if control is not None:  # as WebUI's ControlNet extension writes it, so PNG Info shows it
        fields.append(f'ControlNet 0: "Model: {control.path.stem}, Weight: {control.scale:g}, '
                      f'Image: {Path(control.images[job.index % len(control.images)]).name}"')
    hashes = [f"{n.path.stem}: {n.short_hash}" for n in networks if n.short_hash]
    if hashes:
        fields.append(f'Lora hashes: "{", ".join(hashes)}"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def multipliers(job: Job, networks: list[AppliedNetwork]) -> list[float]:
    """Each network's multiplier for this image: the prompt's --am (its last value repeated, as
    kohya), else --network_mul."""
    muls = job.prompt.network_muls
    if not muls:
        return [n.multiplier for n in networks]
    return [muls[min(i, len(muls) - 1)] for i in range(len(networks))]


def set_multipliers(job: Job, networks: list[AppliedNetwork]) -> None:
    for applied, mul in zip(networks, multipliers(job, networks)):
        applied.network.set_multiplier(mul)


def save_png(image, out_dir: Path, stamp: str, job: Job, text: str, prefix: str = "") -> Path:
    """Write im_<stamp>_<prefix><index>_<seed>.png atomically (a new name if that one exists);
    the highres fix's passes are told apart by the prefix 0 / 1, as kohya names them."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from library.fileio import atomic_path

    name = f"im_{stamp}_{prefix}{job.index:03d}_{job.seed}"
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

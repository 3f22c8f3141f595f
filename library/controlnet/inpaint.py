"""The inpainting condition (--conditioning_type inpaint) and the inference side of inpainting.

Condition = the training image in [0, 1] with the hole's pixels set to -1 in all three channels:
the convention of diffusers' inpaint ControlNet (lllyasviel's control_v11p_sd15_inpaint,
`image[mask > 0.5] = -1.0`), so the mask travels inside the three channels and a ControlNet trained
here loads wherever that one does (and can start from it with --controlnet_model_name_or_path).

The hole of one training sample, drawn with a generator seeded from (--seed, epoch, batch position,
place in the batch), so an epoch's masks are the same after a resume and with cached latents:
- with probability 1 - --random_mask_prob: one of the image's COCO instances, chosen at random
  (one that the training crop shows), its caption "a <category>";
- else (and always for images without instances) a random box or a few random strokes, the
  caption naming every category of the image;
then dilated by --mask_dilation pixels of the training image. The target latents are the whole
image's, so --cache_latents works; only the condition is drawn per sample.

Inference: the input image and mask are resized to a generation size near the training
resolution, the mask dilated there, the ControlNet pipeline generates, and the result is pasted
back into the original image inside the (dilated, resized) mask only: outside it the output is the
input, pixel for pixel, at the input's own size.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from library.controlnet.coco import InpaintSpec, decode_mask, with_article
from library.errors import UserError

HOLE = -1.0
CAPTION_MODES = ("instance", "image", "none")


# --- masks ----------------------------------------------------------------------------------------

def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a bool mask by `pixels` in every direction (a disc-shaped kernel)."""
    if pixels <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to (w, h); a pixel is in the hole if any of it was."""
    h, w = mask.shape
    if (w, h) == tuple(size):
        return mask.astype(bool)
    interp = cv2.INTER_AREA if size[0] * size[1] < w * h else cv2.INTER_LINEAR
    return cv2.resize(mask.astype(np.float32), tuple(size), interpolation=interp) > 1e-3


def fit_mask(mask: np.ndarray, placement) -> np.ndarray:
    """A mask of the original image, resized and cropped exactly like the image (library.data.transforms)."""
    from library.data.transforms import crop_origin

    resized = resize_mask(mask, placement.resized)
    (left, top), (bw, bh) = crop_origin(placement), placement.bucket
    return resized[top:top + bh, left:left + bw]


def random_box(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A box of 10-50 % of each side at a random place."""
    bw = max(1, int(round(rng.uniform(0.1, 0.5) * width)))
    bh = max(1, int(round(rng.uniform(0.1, 0.5) * height)))
    x, y = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
    mask = np.zeros((height, width), bool)
    mask[y:y + bh, x:x + bw] = True
    return mask


def random_strokes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """1-3 brush strokes: polylines of 2-5 points, 3-10 % of the short side thick."""
    canvas = np.zeros((height, width), np.uint8)
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        thickness = max(2, int(round(rng.uniform(0.03, 0.10) * side)))
        point = rng.uniform(0, 1, 2) * (width, height)
        for _ in range(int(rng.integers(1, 5))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * side
            nxt = np.clip(point + length * np.array([math.cos(angle), math.sin(angle)]), 0, (width - 1, height - 1))
            cv2.line(canvas, tuple(int(v) for v in point), tuple(int(v) for v in nxt), 1, thickness)
            point = nxt
    return canvas.astype(bool)


def random_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    return random_box(rng, width, height) if rng.random() < 0.5 else random_strokes(rng, width, height)


def masked_condition(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """HxWx3 float32: the image in [0, 1] (uint8 input is divided by 255), -1 in the hole."""
    cond = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)  # a new array
    cond[hole.astype(bool)] = HOLE
    return cond


def hole_of(cond: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] conditions -> [B, 1, H, W] float hole masks (every channel at -1)."""
    return (cond.float().amax(dim=1, keepdim=True) < HOLE + 0.5).float()


# --- the conditioning type --------------------------------------------------------------------------

class InpaintConditioning:
    name = "inpaint"

    def __init__(self, mask_dilation: int = 4, random_mask_prob: float = 0.25, caption_mode: str = "instance",
                 min_mask_area: float = 0.0):
        if mask_dilation < 0:
            raise UserError(f"--mask_dilation must be >= 0 (got {mask_dilation}).", fix="pass e.g. --mask_dilation 4.")
        if not 0 <= random_mask_prob <= 1:
            raise UserError(f"--random_mask_prob must be in [0, 1] (got {random_mask_prob}).",
                            fix="pass e.g. --random_mask_prob 0.25.")
        if caption_mode not in CAPTION_MODES:
            raise UserError(f"unknown --inpaint_caption {caption_mode!r}.",
                            fix=f"use one of: {', '.join(CAPTION_MODES)}.")
        self.mask_dilation, self.random_mask_prob = int(mask_dilation), float(random_mask_prob)
        self.caption_mode, self.min_mask_area = caption_mode, float(min_mask_area)

    def spec(self, entry: dict, where: str) -> InpaintSpec:
        """COCO entries carry their instances; other images (folders, listings) get random masks only."""
        return entry.get("inpaint") or InpaintSpec(entry["image"], (), None, entry.get("caption") or "")

    def sample(self, spec: InpaintSpec, placement, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """(condition HxWx3 at the training crop, caption) of one training sample."""
        from library.data.probe import load_rgb
        from library.data.transforms import resize_and_crop

        image = resize_and_crop(np.asarray(load_rgb(spec.path)), placement)
        bw, bh = placement.bucket
        hole, caption = None, spec.caption
        if spec.instances and rng.random() >= self.random_mask_prob:
            width, height = spec.size
            for k in rng.permutation(len(spec.instances)):  # the first instance the crop shows
                inst = spec.instances[int(k)]
                mask = fit_mask(decode_mask(inst.segmentation, height, width), placement)
                if mask.any():
                    hole, caption = mask, with_article(inst.category)
                    break
        if hole is None:
            hole = random_mask(rng, bw, bh)
        if self.caption_mode == "image":
            caption = spec.caption
        elif self.caption_mode == "none":
            caption = ""
        return masked_condition(image, dilate(hole, self.mask_dilation)), caption

    def render(self, spec: InpaintSpec, image_size, placement) -> np.ndarray:
        """One fixed draw (generator seed 0), for callers without a sample's generator."""
        return self.sample(spec, placement, np.random.default_rng(0))[0]

    def weight_source(self, cond: torch.Tensor) -> torch.Tensor:
        """The hole: --loss_weight_factor weighs the loss where the ControlNet has to paint."""
        return hole_of(cond)

    def describe(self) -> dict:
        return {"conditioning_type": self.name, "mask_dilation": self.mask_dilation,
                "random_mask_prob": self.random_mask_prob, "inpaint_caption": self.caption_mode,
                "min_mask_area": self.min_mask_area, "hole_value": HOLE}


# --- inference ------------------------------------------------------------------------------------

def load_mask(path, size: tuple[int, int], warn=None) -> np.ndarray:
    """A mask file (white = the hole; grey > 127 counts) as an HxW bool array of the image's size (w, h)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the mask {path} ({err}).", path=path,
                        fix="pass a PNG (or any image) that is white where the picture should be repainted.") from None
    mask = gray > 127
    if (gray.shape[1], gray.shape[0]) != tuple(size):
        if warn:
            warn(f"the mask {path} is {gray.shape[1]} x {gray.shape[0]}, the image {size[0]} x {size[1]}; "
                 "the mask is stretched to the image.")
        mask = resize_mask(mask, size)
    if not mask.any():
        raise UserError(f"the mask {path} has no white pixel, so there is nothing to inpaint.", path=path,
                        fix="paint the area to replace white (255) on black.")
    return mask


def generation_size(width: int, height: int, resolution, multiple: int) -> tuple[int, int]:
    """The input's aspect ratio at about the training resolution's area, in multiples of `multiple`."""
    area = float(resolution[0] * resolution[1])
    scale = math.sqrt(area / (width * height))
    return (max(multiple, int(round(width * scale / multiple)) * multiple),
            max(multiple, int(round(height * scale / multiple)) * multiple))


def size_multiple(vae, unet) -> int:
    """Pixel sizes the model can generate: VAE downsampling x the UNet's."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)


def prepare(image: np.ndarray, mask: np.ndarray, gen_size: tuple[int, int], dilation: int):
    """(condition at gen_size, hole at gen_size, paste mask at the input's size) for an HxWx3 uint8
    image and its HxW bool mask. The paste mask holds the input mask and the dilated hole."""
    from library.data.transforms import resize_to

    h, w = mask.shape
    hole = dilate(resize_mask(mask, gen_size), dilation)
    cond = masked_condition(resize_to(image, gen_size), hole)
    paste = resize_mask(hole, (w, h)) | mask
    return cond, hole, paste


def composite(original: np.ndarray, generated: np.ndarray, paste: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 at the original's size: the original outside `paste`, the generated image (any
    size, float [0, 1] or uint8) resized to it inside."""
    from library.data.transforms import resize_to

    gen = generated if generated.dtype == np.uint8 else (np.clip(generated, 0, 1) * 255).round().astype(np.uint8)
    gen = resize_to(gen, (original.shape[1], original.shape[0]))
    out = original.copy()
    out[paste] = gen[paste]
    return out


def inpaint(pipe, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int, gen_size: tuple[int, int],
            dilation: int, steps: int = 30, cfg: float = 7.5, controlnet_scale: float = 1.0,
            negative: str = "") -> dict:
    """Inpaint one HxWx3 uint8 image inside its HxW bool mask with a ControlNet pipeline
    (library.controlnet.inference.build_pipeline). Returns {"result": uint8 at the input's size,
    "generated": float [0, 1] at gen_size, "paste": the bool mask of the replaced pixels,
    "condition": the ControlNet's input}."""
    from library.controlnet.inference import generate

    cond, _, paste = prepare(image, mask, gen_size, dilation)
    generated = generate(pipe, [prompt], [cond], [seed], steps, cfg, controlnet_scale, [negative])[0]
    return {"result": composite(image, generated, paste), "generated": generated, "paste": paste,
            "condition": cond}


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None, peak: float = 1.0) -> float:
    """PSNR in dB of two images over a bool region (all pixels by default); inf when equal."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if region is not None:
        a, b = a[region], b[region]
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)

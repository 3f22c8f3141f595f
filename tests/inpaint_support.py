"""A synthetic mini-COCO for the inpainting tests: toy-world images written with a real COCO
instances JSON (polygons, compressed and uncompressed RLE), where the category fixes the colour.

Categories are "red circle" and "blue circle": one or two disks on a plain grey, so an instance's
caption "a red circle" is a prompt the toy base knows. Measures: the colour class of the generated
pixels inside an instance's shape (its category, another category, or the background), and the
same for a disk of the right colour at a random place (the chance that a model ignoring the hole
paints it there).

The learning test's base (`inpaint_toy_base`) is the radar toy base's VAE and text encoder
(tests/controlnet_support.py) with a UNet trained here on this world at 32 px (8x8 latents): a
ControlNet step costs a quarter of one at 64 px, which keeps the learning proof within minutes.
Cached in .cache/controlnet-toy/inpaint-<recipe hash>/ like the radar base.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from library.toy import world
from tests import controlnet_support as S

CATEGORIES = {1: "red circle", 2: "blue circle"}
COLOUR_OF = {name: np.asarray(S.COLOURS[name.split()[0]], np.float32) for name in CATEGORIES.values()}
SIZE, RADIUS, MARGIN = 32, 4.0, 5.0   # the learning test's world
RECIPE = {"version": 1, "seed": 0, "unet_steps": 1500, "unet_batch": 32, "unet_lr": 1e-3, "unet_images": 4096,
          "caption_dropout": 0.1}
UNET = {**S.UNET, "sample_size": SIZE // 4}


def scene(rng: np.random.Generator, category: str, size: int = SIZE, radius: float = RADIUS,
          margin: float = MARGIN) -> tuple[np.ndarray, float, float, float]:
    """One disk of the category's colour on a random grey: (float image, cx, cy, grey)."""
    grey = float(rng.uniform(0.15, 0.55))
    cx, cy = (float(v) + 0.5 for v in rng.uniform(margin, size - 1 - margin, 2))
    image = world.render(world.Scene("circle", tuple(COLOUR_OF[category]), (grey,) * 3, cx, cy, radius), size)
    return image, cx, cy, grey


def _train_unet(unet, vae, text_encoder, tokenizer, scheduler, r: dict) -> float:
    from library.models.text import encode_captions

    rng = np.random.default_rng(r["seed"] + 7)
    names = list(CATEGORIES.values())
    cats = [names[i % len(names)] for i in range(r["unet_images"])]
    images = np.stack([scene(rng, c)[0] for c in cats])
    with torch.no_grad():
        latents = torch.cat([vae.encode(S._to_tensor(images[i:i + 512])).latent_dist.mean
                             for i in range(0, len(images), 512)]) * vae.config.scaling_factor
        captions = [f"a {c}" for c in names] + [""]
        hidden = dict(zip(captions, encode_captions(tokenizer, text_encoder, captions)))
    return S.fit_toy_unet(unet, scheduler, latents, [f"a {c}" for c in cats], hidden, r)


def inpaint_toy_base() -> Path:
    """The cached 32 px base (built on first use from the radar base's VAE and text encoder; about
    two minutes of one CPU thread for the UNet)."""
    from diffusers import UNet2DConditionModel

    from library.fileio import file_lock, write_json_atomic
    from library.models.loading import load_sd_model
    from library.models.saving import save_diffusers

    radar = S.radar_toy_base()
    key = hashlib.sha256(json.dumps([RECIPE, UNET, SIZE, RADIUS, MARGIN, str(radar.parent.name)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    folder = S.cache_root() / f"inpaint-{key}"
    with file_lock(folder.with_name(f".inpaint-{key}.lock")):  # parallel test workers wait for one build
        if not (folder / "stats.json").is_file():  # written last: the model folder is complete
            print(f"[inpaint toy] building the 32 px base in {folder} (cached for later runs)", flush=True)
            model = load_sd_model(radar)
            torch.manual_seed(RECIPE["seed"])
            unet = UNet2DConditionModel(**UNET)
            t0 = time.perf_counter()
            loss = _train_unet(unet.train(), model.vae, model.text_encoder, model.tokenizer, model.noise_scheduler,
                               RECIPE)
            model.unet = unet.eval()
            model.model_name = "inpaint-toy"
            save_diffusers(model, folder / "model")
            write_json_atomic(folder / "stats.json", {"unet_loss": loss, "unet_s": time.perf_counter() - t0})
    return folder / "model"


def disk_polygon(cx: float, cy: float, r: float, points: int = 24) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return [round(float(v), 2) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def segmentation(kind: str, cx: float, cy: float, r: float, size: tuple[int, int]):
    """The disk as a COCO segmentation of `kind` polygon | rle | rle_list (uncompressed)."""
    from pycocotools import mask as mask_utils

    if kind == "polygon":
        return [disk_polygon(cx, cy, r + 0.5)]
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= (r + 0.5) ** 2).astype(np.uint8)
    if kind == "rle":
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    counts, prev, run = [], 0, 0  # COCO's uncompressed RLE: alternating runs of 0s and 1s, column-major
    for v in mask.flatten(order="F").tolist():
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    return {"size": [h, w], "counts": counts + [run]}


def seg_area(seg, size) -> float:
    from library.controlnet.coco import to_rle
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(to_rle(seg, size[1], size[0])))


def write_mini_coco(root, count: int, seed: int, instances_per_image=(1, 1), kinds=("polygon", "rle", "rle_list"),
                    size: int = 64, radius: float = 5.0, margin: float = 8.0) -> dict:
    """root/images/*.png + root/instances.json. Returns {"image_dir", "ann_file", "items"}: items[i] =
    {"file", "grey", "instances": [{"category", "cx", "cy", "r", "id"}]}."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, items = [], [], []
    ann_id = 0
    for i in range(count):
        grey = float(rng.uniform(0.15, 0.55))
        canvas = np.full((size, size, 3), grey, np.float32)
        n = int(rng.integers(instances_per_image[0], instances_per_image[1] + 1))
        placed = []
        while len(placed) < n:
            cx, cy = (float(v) + 0.5 for v in rng.uniform(margin, size - 1 - margin, 2))
            if all((cx - p["cx"]) ** 2 + (cy - p["cy"]) ** 2 > (4 * radius) ** 2 for p in placed):
                cat = 1 + (i + len(placed)) % len(CATEGORIES)
                placed.append({"category": CATEGORIES[cat], "cat_id": cat, "cx": cx, "cy": cy, "r": radius})
        for p in placed:
            canvas = world.render(world.Scene("circle", tuple(COLOUR_OF[p["category"]]), (grey,) * 3, p["cx"],
                                              p["cy"], p["r"]), size, background=canvas)
            ann_id += 1
            seg = segmentation(kinds[ann_id % len(kinds)], p["cx"], p["cy"], p["r"], (size, size))
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": p["cat_id"], "segmentation": seg,
                                "area": seg_area(seg, (size, size)), "bbox": [p["cx"] - radius, p["cy"] - radius,
                                                                              2 * radius, 2 * radius], "iscrowd": 0})
            p["id"] = ann_id
        name = f"{i + 1:06d}.png"
        Image.fromarray(world.to_uint8(canvas)).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        items.append({"file": str(root / "images" / name), "grey": grey, "instances": placed})
    data = {"info": {"description": "toy mini-COCO"}, "images": images, "annotations": annotations,
            "categories": [{"id": k, "name": v, "supercategory": "shape"} for k, v in CATEGORIES.items()]}
    (root / "instances.json").write_text(json.dumps(data))
    return {"image_dir": root / "images", "ann_file": root / "instances.json", "items": items}


def disk_mask(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def colour_class(image: np.ndarray, region: np.ndarray, grey: float, min_pixels: float) -> str:
    """What the region of an image (float [0, 1]) shows: each pixel goes to the nearest of the
    category colours and the image's background grey; the region's class is the category with the
    most pixels if it has at least `min_pixels` of them, else "background"."""
    refs = {**COLOUR_OF, "background": np.full(3, grey, np.float32)}
    names = list(refs)
    pixels = image[region].reshape(-1, 3)
    dist = np.stack([np.sum((pixels - refs[k]) ** 2, axis=1) for k in names])
    counts = np.bincount(dist.argmin(axis=0), minlength=len(names))[:-1]
    best = int(counts.argmax())
    return names[best] if counts[best] >= min_pixels else "background"


def chance_rate(items, holes, size: int = SIZE, margin: float = MARGIN, draws: int = 50, seed: int = 3) -> float:
    """How often a disk of the right colour at a random place (the world's distribution) would count
    as the right colour in the instance's hole: what a model that ignores the hole scores."""
    rng = np.random.default_rng(seed)
    hits = total = 0
    for item, hole in zip(items, holes):
        inst = item["instances"][0]
        for _ in range(draws):
            cx, cy = (float(v) + 0.5 for v in rng.uniform(margin, size - 1 - margin, 2))
            img = world.render(world.Scene("circle", tuple(COLOUR_OF[inst["category"]]), (item["grey"],) * 3, cx, cy,
                                           inst["r"]), size)
            hits += colour_class(img, hole, item["grey"], object_pixels(inst) / 2) == inst["category"]
            total += 1
    return hits / total


def object_pixels(inst) -> float:
    return float(np.pi * inst["r"] ** 2)

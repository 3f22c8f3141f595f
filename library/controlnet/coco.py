"""COCO instance annotations -> inpainting entries (one per image that has a usable instance).

    --image_dir data/coco/train2017 --ann_file data/coco/annotations/instances_train2017.json

The file is COCO's "instances" JSON: `images` ({id, file_name, width, height}), `annotations`
({id, image_id, category_id, segmentation, area, iscrowd}) and `categories` ({id, name}). A
segmentation is a list of polygons ([x1, y1, x2, y2, ...] in pixels of the image) or a run-length
encoding ({"counts": [...] or "...", "size": [height, width]}); pycocotools decodes both.

Usable instances: not `iscrowd` (a crowd region covers many objects), a segmentation of a known
shape, an area (COCO's `area`, pixels of the original image) of at least --min_mask_area. Images
without a usable instance are left out. Everything is checked here, before any model is loaded;
masks are decoded later, one per training sample (library.controlnet.inpaint).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.errors import UserError

VOWELS = "aeiou"


@dataclass(frozen=True)
class Instance:
    segmentation: object   # polygons (list of lists) or an RLE dict, as in the JSON
    category: str
    area: float
    ann_id: object = None


@dataclass(frozen=True)
class InpaintSpec:
    """What the inpaint condition needs for one image: its instances (possibly none: random masks
    only) and the size the annotations were made at (w, h)."""

    path: str
    instances: tuple = field(default_factory=tuple)
    size: tuple | None = None
    caption: str = ""


def with_article(name: str) -> str:
    """'dog' -> 'a dog', 'apple' -> 'an apple' (the caption of one instance)."""
    name = str(name).strip()
    return f"{'an' if name[:1].lower() in VOWELS else 'a'} {name}" if name else ""


def image_caption(instances) -> str:
    """The caption of a whole image: its categories in order of first appearance, 'a dog, a person'."""
    names = list(dict.fromkeys(i.category for i in instances))
    return ", ".join(with_article(n) for n in names)


def _check_segmentation(seg, height: int, width: int) -> str | None:
    """Why a segmentation cannot be decoded, or None."""
    if isinstance(seg, list):
        if not seg:
            return "an empty polygon list"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return "a polygon with fewer than 3 points or an odd number of coordinates"
            if not all(isinstance(v, (int, float)) for v in poly):
                return "a polygon with non-numeric coordinates"
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not isinstance(counts, (list, str)) or not isinstance(size, list) or len(size) != 2:
            return "an RLE without 'counts' and a two-number 'size'"
        if [int(size[0]), int(size[1])] != [int(height), int(width)]:
            return f"an RLE of size {size} on an image of {height} x {width}"
        return None
    return f"a segmentation of type {type(seg).__name__}"


def to_rle(seg, height: int, width: int):
    """Any COCO segmentation -> one compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons: one RLE each, merged
        return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width))
    if isinstance(seg.get("counts"), list):  # uncompressed RLE (COCO's crowd format)
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": seg["size"], "counts": seg["counts"]}


def decode_mask(seg, height: int, width: int) -> np.ndarray:
    """HxW bool mask of a segmentation."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(to_rle(seg, height, width)).astype(bool)


def _area(seg, height: int, width: int) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(to_rle(seg, height, width)))


def read_coco(image_dir, ann_file, min_mask_area: float = 0.0, skip_missing: bool = False,
              warn=None) -> list[dict]:
    """Entries (as library.controlnet.data's listings give them) for every image with a usable
    instance; each carries an `inpaint` InpaintSpec. Problems stop the run with one UserError."""
    image_dir, ann_file = Path(image_dir) if image_dir else None, Path(ann_file)
    if not ann_file.is_file():
        raise UserError("the --ann_file does not exist.", path=ann_file,
                        fix="pass COCO's instances JSON, e.g. "
                            "--ann_file data/coco/annotations/instances_train2017.json.")
    if image_dir is None or not image_dir.is_dir():
        raise UserError("the --image_dir folder does not exist." if image_dir else "--ann_file needs --image_dir.",
                        path=image_dir, fix="pass the folder holding the annotated images, e.g. "
                                            "--image_dir data/coco/train2017.")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"the --ann_file {ann_file} is not valid JSON ({err}).", path=ann_file,
                        fix="pass COCO's instances JSON (images, annotations, categories).") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise UserError(f"the --ann_file {ann_file} has no 'images' and 'annotations' lists.", path=ann_file,
                        fix="pass a COCO instances JSON (instances_*.json, not captions_* or person_keypoints_*).")
    categories = {c.get("id"): str(c.get("name", c.get("id"))) for c in data.get("categories") or []
                  if isinstance(c, dict)}
    images = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            raise UserError(f"an entry of 'images' in {ann_file} lacks 'id' or 'file_name' ({str(img)[:80]}).",
                            path=ann_file, fix="give every image an id, a file_name, a width and a height.")
        images[img["id"]] = img
    per_image: dict = {}
    problems, crowd, small = [], 0, 0
    for ann in data["annotations"]:
        where = f"annotation {ann.get('id', '?')}" if isinstance(ann, dict) else "an annotation"
        img = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if img is None:
            problems.append(f"{where} refers to image_id {ann.get('image_id') if isinstance(ann, dict) else '?'}, "
                            "which 'images' does not list")
            continue
        if ann.get("iscrowd"):
            crowd += 1
            continue
        height, width = int(img.get("height") or 0), int(img.get("width") or 0)
        if height <= 0 or width <= 0:
            problems.append(f"image {img['file_name']} has no width/height in the JSON")
            continue
        why = _check_segmentation(ann.get("segmentation"), height, width)
        if why:
            problems.append(f"{where} ({img['file_name']}) has {why}")
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) else _area(ann["segmentation"], height, width)
        if area < min_mask_area or area <= 0:
            small += 1
            continue
        cat = ann.get("category_id")
        if cat not in categories:
            problems.append(f"{where} has category_id {cat}, which 'categories' does not list")
            continue
        per_image.setdefault(img["id"], []).append(Instance(ann["segmentation"], categories[cat], area,
                                                            ann.get("id")))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {ann_file}: " + "; ".join(problems[:10]) + ".",
                        path=ann_file, fix="correct the annotations named above (COCO's format: polygons or RLE "
                                           "per annotation, ids that match 'images' and 'categories').")
    if not per_image:
        raise UserError(f"no usable instance in {ann_file}: {len(data['annotations'])} annotation(s), {crowd} crowd "
                        f"region(s) left out, {small} smaller than --min_mask_area {min_mask_area:g} pixels.",
                        path=ann_file, fix="lower --min_mask_area (it counts pixels of the original image, COCO's "
                                           "'area'), or check that the file holds instance annotations.")
    entries, missing = [], []
    for image_id, instances in per_image.items():
        img = images[image_id]
        path = image_dir / img["file_name"]
        if not path.is_file():
            missing.append(str(path))
            continue
        spec = InpaintSpec(str(path), tuple(instances), (int(img["width"]), int(img["height"])),
                           image_caption(instances))
        entries.append({"image": str(path), "caption": spec.caption, "conditioning": None, "targets": None,
                        "inpaint": spec, "split": "train", "where": f"{img['file_name']} (image_id {image_id})"})
    if missing and not (skip_missing and entries):
        raise UserError(f"{len(missing)} annotated image(s) are not in --image_dir {image_dir}: "
                        + ", ".join(missing[:10]) + ("" if len(missing) <= 10 else ", ..."), path=ann_file,
                        fix="point --image_dir at the folder of the annotated images (file_name is relative to "
                            "it), or pass --skip_bad_images to leave the missing ones out.")
    if missing and warn:
        warn(f"{len(missing)} annotated image(s) are missing from {image_dir} and left out (--skip_bad_images).")
    left_out = len(images) - len(per_image)
    if left_out and warn:
        warn(f"{left_out} image(s) of {ann_file.name} have no usable instance and are left out "
             f"({crowd} crowd region(s), {small} instance(s) under --min_mask_area {min_mask_area:g}).")
    return entries


def check_sizes(entries: list[dict], records: list, skip: bool, warn=None) -> tuple[list[dict], list]:
    """The annotations were drawn on the image as the JSON measures it; an image on disk of another
    (upright) size, e.g. one with an EXIF rotation, would get misplaced masks."""
    sizes = {r.path: tuple(r.size) for r in records}
    drop = [e for e in entries if e["image"] in sizes and sizes[e["image"]] != e["inpaint"].size]
    if not drop:
        return entries, records
    bad = [f"{e['image']} is {sizes[e['image']][0]} x {sizes[e['image']][1]} but annotated as "
           f"{e['inpaint'].size[0]} x {e['inpaint'].size[1]}" for e in drop]
    if not skip:
        raise UserError(f"{len(bad)} image(s) differ in size from their annotations: " + "; ".join(bad[:10]) + ".",
                        fix="use the images the annotations were made on (check for EXIF rotations), or pass "
                            "--skip_bad_images to leave them out.")
    if warn:
        warn(f"{len(bad)} image(s) differ in size from their annotations and are left out (--skip_bad_images).")
    paths = {e["image"] for e in drop}
    return [e for e in entries if e["image"] not in paths], [r for r in records if r.path not in paths]

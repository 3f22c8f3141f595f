"""Conditioning datasets: (image, condition, caption) triples, batched by the shared data library.

Where the triples come from (first match wins):

1. `--train_listing FILE.jsonl|FILE.toml`, or a `metadata.jsonl` inside `--train_data_dir`
   (diffusers "imagefolder" style; the radar schema). One object per image:
   {"file_name": "images/1.png", "text": "caption", "conditioning_file_name": "cond/1.png",
    "targets": [{"range": 85.2, "velocity": -12.5, "amplitude": 1.0}], "split": "train"}
   Paths are relative to the listing's folder. A TOML listing holds the same keys in [[items]].
2. `--image_dir` + `--ann_file` (COCO instances JSON, library.controlnet.coco): the inpainting
   condition's images and instance masks; captions name the masked instance's category.
3. `--train_data_dir` with kohya's `<repeats>_<name>` subfolders + `--conditioning_data_dir`
   (kohya's ControlNet layout: one flat folder of conditioning images with the same base names).
4. `--train_data_dir` holding the images directly (captions beside them) + `--conditioning_data_dir`.

Images, captions, buckets, latent caching and batch order are the data library's (a DatasetGroup);
this module adds the condition of every image to each batch as `controlnet_cond` [B, 3, H, W],
cropped exactly like its image. A type that draws its condition per sample (inpaint: a random
instance or mask) gets a generator seeded from (seed, epoch, batch position, place in the batch), so
an epoch's conditions are the same after a resume; its caption replaces the image's (then the
caption options apply to it as to any caption). Validation images: "split": "val" in a listing, or
`--validation_split` (a seeded share of the images); "split": "test" images are left out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from library.data.config import DATASET_KEYS, REPEATS_DIR_RE, SUBSET_KEYS, DatasetConfig, SubsetConfig, flag_defaults
from library.data.group import DatasetGroup, ImageRecord
from library.errors import UserError

VAL_SPLITS = ("val", "validation", "valid")
SKIPPED_SPLITS = ("test",)
_CONDITION_STREAM = 3  # generator stream of per-sample conditions (library.data.group uses 0 and 1)
_KEYS = {"image": ("file_name", "image", "image_file"), "caption": ("text", "caption", "prompt"),
         "conditioning": ("conditioning_file_name", "conditioning_image", "conditioning")}


def _pick(obj: dict, names) -> object:
    return next((obj[n] for n in names if obj.get(n) is not None), None)


def _entry(obj, root: Path, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not an object.", fix='write one {"file_name": ..., "text": ...} per line.')
    image = _pick(obj, _KEYS["image"])
    if not image:
        raise UserError(f"{where} has no \"file_name\".", fix='add "file_name": "images/xxx.png".')
    cond = _pick(obj, _KEYS["conditioning"])
    return {"image": str(root / image), "caption": str(_pick(obj, _KEYS["caption"]) or ""),
            "conditioning": str(root / cond) if cond else None, "targets": obj.get("targets"),
            "split": str(obj.get("split") or "train").lower(), "where": where}


def read_listing(path) -> list[dict]:
    """Entries of a .jsonl (one JSON object per line) or .toml ([[items]]) listing."""
    path = Path(path)
    if not path.is_file():
        raise UserError("the listing file does not exist.", path=path,
                        fix="pass --train_listing with a metadata.jsonl or a .toml listing.")
    root = path.parent
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".toml":
        import toml

        try:
            table = toml.loads(text)
        except toml.TomlDecodeError as err:
            raise UserError(f"the listing {path} is not valid TOML ({err}).", path=path,
                            fix="fix the line named above.") from None
        items = table.get("items", table.get("images"))
        if not isinstance(items, list):
            raise UserError(f"the listing {path} has no [[items]] tables.", path=path,
                            fix='write one [[items]] table per image with file_name = "..." and text = "...".')
        return [_entry(obj, root, f"item {i + 1} of {path}") for i, obj in enumerate(items)]
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"line {n} of {path} is not valid JSON ({err}).", path=path,
                            fix="write one JSON object per line.") from None
        entries.append(_entry(obj, root, f"line {n} of {path}"))
    if not entries:
        raise UserError(f"the listing {path} holds no images.", path=path, fix="add one line per image.")
    return entries


def _by_stem(folder: str) -> dict[str, str]:
    from library.data.scan import list_images

    if not Path(folder).is_dir():
        raise UserError("the --conditioning_data_dir folder does not exist.", path=folder,
                        fix="pass the folder of conditioning images (same base names as the training images).")
    return {Path(p).stem: p for p in list_images(folder)}


def _flat_folder_entries(args) -> list[dict]:
    """Images directly in --train_data_dir, captions beside them, conditions by base name."""
    from library.data.scan import list_images

    ext = flag_defaults(args)["caption_extension"]
    cond = _by_stem(args.conditioning_data_dir) if args.conditioning_data_dir else {}
    entries = []
    for image in list_images(args.train_data_dir):
        caption = ""
        for suffix in (ext, ".txt"):
            cap = Path(image).with_suffix(suffix)
            if cap.is_file():
                caption = cap.read_text(encoding="utf-8-sig").strip().split("\n")[0]
                break
        entries.append({"image": image, "caption": caption, "conditioning": cond.get(Path(image).stem),
                        "targets": None, "split": "train", "where": image})
    if not entries:
        raise UserError("--train_data_dir holds no images, no <repeats>_<name> folders and no metadata.jsonl.",
                        path=args.train_data_dir, fix="point it at your images (see docs/train_controlnet.md, Data).")
    return entries


def _records_from_entries(entries: list[dict], args, source: str, seed) -> tuple[list[DatasetConfig], list]:
    """Probe, bucket and wrap listing entries as the data library's ImageRecords (one subset)."""
    from library.data.buckets import BucketPlanner
    from library.data.probe import probe_images

    defaults = flag_defaults(args)
    values = {k: defaults[k] for k in SUBSET_KEYS if k in defaults}
    values.update(image_dir=str(Path(source).parent if Path(source).is_file() else source),
                  num_repeats=max(1, int(getattr(args, "dataset_repeats", 1) or 1)))
    subset = SubsetConfig(**values)
    config = DatasetConfig(subsets=[subset], source=str(source),
                           **{k: defaults[k] for k in DATASET_KEYS if k in defaults})
    probed = probe_images([e["image"] for e in entries])
    planner = BucketPlanner(config.resolution, config.enable_bucket, config.min_bucket_reso,
                            config.max_bucket_reso, config.bucket_reso_steps, config.bucket_no_upscale)
    records, bad = [], []
    for e in entries:
        size, reason = probed[e["image"]]
        if size is None:
            bad.append(f"{e['image']}: {reason}")
            continue
        records.append(ImageRecord(e["image"], e["caption"], size, planner.place(size), 0, 0, False,
                                   subset.num_repeats, "metadata"))
    if bad and not args.skip_bad_images:
        raise UserError(f"{len(bad)} image(s) of {source} cannot be used: " + "; ".join(bad[:20]), path=source,
                        fix="replace or delete them, or pass --skip_bad_images.")
    return [config], records


def _check_condition_sizes(specs: dict, probed: dict, image_sizes: dict) -> list[str]:
    """A conditioning image must show what its image shows: another size with the same aspect ratio
    is resized to the image (said once); another aspect ratio would be stretched, so it is an error
    (kohya refuses any size difference)."""
    resized, problems = [], []
    for image, spec in specs.items():
        if not isinstance(spec, str) or image not in image_sizes or probed.get(spec, (None,))[0] is None:
            continue
        (iw, ih), (cw, ch) = image_sizes[image], probed[spec][0]
        if (iw, ih) == (cw, ch):
            continue
        if abs(iw / ih - cw / ch) <= 0.01 * (iw / ih):
            resized.append(spec)
        else:
            problems.append(f"{spec} is {cw} x {ch} but its image {os.path.basename(image)} is {iw} x {ih} "
                            f"(another aspect ratio: it would be stretched)")
    if resized:
        from library.logs import warn_once

        warn_once(f"{len(resized)} conditioning image(s) have another size than their image but the same aspect "
                  f"ratio; they are resized to their image's size (e.g. {os.path.basename(resized[0])}).")
    return problems


def _check_conditions(ctype, entries: list[dict], image_sizes: dict | None = None) -> dict[str, object]:
    """Every image's condition spec, all problems at once; conditioning files are decoded once.
    `image_sizes` ({image path: (w, h)}): conditioning images are checked against them."""
    from library.data.probe import probe_images

    specs, problems = {}, []
    for e in entries:
        try:
            specs[e["image"]] = ctype.spec(e, e["where"])
        except UserError as err:
            problems.append(str(err).split(" Fix:")[0])
    files = sorted({s for s in specs.values() if isinstance(s, str)})
    probed = probe_images(files)
    problems += [f"{p}: {why}" for p, (size, why) in probed.items() if size is None]
    problems += _check_condition_sizes(specs, probed, image_sizes or {})
    if problems:
        raise UserError(f"{len(problems)} conditioning problem(s): " + "; ".join(problems[:20]) + ".",
                        fix="give every training image its condition (a conditioning image or radar targets) "
                            "with the image's aspect ratio (crop or pad the conditioning image to match).")
    _warn_outside_targets(ctype, specs)
    return specs


def _warn_outside_targets(ctype, specs: dict) -> None:
    axes = getattr(ctype, "axes", None)
    if axes is None:
        return
    outside = {p: sum(not axes.inside(t.range, t.velocity) for t in s) for p, s in specs.items()
               if isinstance(s, list)}
    outside = {p: n for p, n in outside.items() if n}
    if outside:
        from library.logs import warn_once

        names = ", ".join(os.path.basename(p) for p in list(outside)[:5])
        warn_once(f"{sum(outside.values())} target(s) in {len(outside)} image(s) lie outside range "
                  f"[0, {axes.range_max:g}] x velocity [-{axes.vel_max:g}, {axes.vel_max:g}] and are left out "
                  f"(e.g. {names}); check --range_max / --vel_max.")


def _split(records: list, entries_split: dict[str, str], fraction: float, seed: int):
    train = [r for r in records if entries_split.get(r.path, "train") not in VAL_SPLITS + SKIPPED_SPLITS]
    val = [r for r in records if entries_split.get(r.path) in VAL_SPLITS]
    if fraction and not val:
        order = np.random.default_rng([int(seed) % (1 << 32), 7]).permutation(len(train))
        n_val = min(len(train) - 1, max(1, round(len(train) * fraction)))
        chosen = set(order[:n_val].tolist())
        val = [r for i, r in enumerate(train) if i in chosen]
        train = [r for i, r in enumerate(train) if i not in chosen]
    if not train:
        raise UserError("no training images are left after taking the validation images out.",
                        fix="mark fewer images \"split\": \"val\", or lower --validation_split.")
    return train, [dataclasses.replace(r, repeats=1) for r in val]


def _coco_entries(args, seed: int, warn):
    from library.controlnet import coco

    if not args.ann_file:
        raise UserError("--image_dir is given without --ann_file.",
                        fix="pass the COCO instances JSON of those images with --ann_file, or use --train_data_dir "
                            "for a folder of images without annotations.")
    if args.train_listing or args.train_data_dir:
        raise UserError("--ann_file/--image_dir and --train_data_dir/--train_listing are two data sources.",
                        fix="pass one of them.")
    if args.conditioning_type not in ("auto", "inpaint"):
        raise UserError(f"COCO annotations (--ann_file) give inpainting masks, not a {args.conditioning_type!r} "
                        "condition.", fix="pass --conditioning_type inpaint (or leave it at auto).")
    entries = coco.read_coco(args.image_dir, args.ann_file, args.min_mask_area, args.skip_bad_images, warn)
    configs, records = _records_from_entries(entries, args, args.image_dir, seed)
    entries, records = coco.check_sizes(entries, records, args.skip_bad_images, warn)
    return entries, configs, records


def build_datasets(args, seed: int, warn=None):
    """(train ConditionedGroup, validation ConditionedGroup or None, conditioning type), every input
    checked before any model is loaded."""
    from library.controlnet import conditioning

    for flag in ("flip_aug", "random_crop"):
        if getattr(args, flag, False):
            raise UserError(f"--{flag} would move the image but not its condition.", fix=f"drop --{flag}.")
    listing = args.train_listing
    data_dir = args.train_data_dir
    if not listing and data_dir and (Path(data_dir) / "metadata.jsonl").is_file():
        listing = str(Path(data_dir) / "metadata.jsonl")
    ann_file = getattr(args, "ann_file", None)
    if ann_file or getattr(args, "image_dir", None):
        entries, configs, records = _coco_entries(args, seed, warn)
    elif listing:
        entries = read_listing(listing)
        configs, records = _records_from_entries(entries, args, listing, seed)
    elif not data_dir:
        raise UserError("no training data given.", fix="pass --train_data_dir (with --conditioning_data_dir) "
                                                       "or --train_listing.")
    elif any(REPEATS_DIR_RE.match(p.name) and p.is_dir() for p in Path(data_dir).iterdir()):
        from library.data import build_dataset_group, dataset_configs_from_args

        group = build_dataset_group(dataset_configs_from_args(args), seed=seed,
                                    skip_bad_images=args.skip_bad_images)
        cond = _by_stem(args.conditioning_data_dir) if args.conditioning_data_dir else {}
        configs, records = group.datasets, group.images
        entries = [{"image": r.path, "caption": r.caption, "conditioning": cond.get(Path(r.path).stem),
                    "targets": None, "split": "train", "where": r.path} for r in records]
    else:
        entries = _flat_folder_entries(args)
        configs, records = _records_from_entries(entries, args, data_dir, seed)
    ctype = conditioning.from_args(args, warn, entries)
    specs = _check_conditions(ctype, [e for e in entries if e["split"] not in SKIPPED_SPLITS],
                              {r.path: tuple(r.size) for r in records})
    train, val = _split(records, {e["image"]: e["split"] for e in entries}, args.validation_split, seed)
    train_group = ConditionedGroup(DatasetGroup(configs, train, seed=seed), specs, ctype)
    val_group = ConditionedGroup(DatasetGroup(configs, val, seed=seed), specs, ctype) if val else None
    return train_group, val_group, ctype


class ConditionedGroup:
    """A DatasetGroup whose batches also carry `controlnet_cond`; everything else is the group's."""

    def __init__(self, base: DatasetGroup, specs: dict, ctype):
        self.base, self.specs, self.ctype = base, specs, ctype

    def __getattr__(self, name):  # summary, cache_latents, metadata, images, ... come from the group
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def num_batches_per_epoch(self) -> int:
        return self.base.num_batches_per_epoch

    def sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str | None]:
        """(condition, caption or None = the image's own) of image `index` for one sample."""
        rec = self.base.images[index]
        draw = getattr(self.ctype, "sample", None)
        if draw is None:
            return self.ctype.render(self.specs[rec.path], rec.size, rec.placement), None
        return draw(self.specs[rec.path], rec.placement, rng)

    def epoch_dataset(self, epoch: int, seed: int | None = None, start: int = 0):
        return ConditionedEpoch(self, self.base.epoch_dataset(epoch, seed, start))


class ConditionedEpoch(torch.utils.data.Dataset):
    def __init__(self, group: ConditionedGroup, inner):
        self.group, self.inner = group, inner
        self.needs_workers = getattr(inner, "needs_workers", True)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        from library.data.transforms import process_caption

        batch = self.inner[i]
        position = self.inner.start + i
        ref = self.inner.refs[position]
        epoch, seed = self.inner.epoch, self.inner.seed
        conds = []
        for slot, k in enumerate(ref.items):
            rng = np.random.default_rng([int(v) % (1 << 64) for v in (seed, epoch, _CONDITION_STREAM, position, slot)])
            cond, caption = self.group.sample(k, rng)
            if caption is not None:
                subset = self.group.base.subset_of(self.group.base.images[k])
                batch["captions"][slot] = process_caption(caption, subset, rng, epoch)
            conds.append(torch.from_numpy(np.ascontiguousarray(cond)).permute(2, 0, 1))
        batch["controlnet_cond"] = torch.stack(conds).float()
        return batch

"""What the user reads before training (summary) and what goes into the saved LoRA (metadata).

Metadata uses kohya's ss_* names and formats (all values strings, JSON where kohya writes JSON)
so tools that read kohya LoRAs show our datasets the same way.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from library.data.transforms import tag_counts


def _subset_rows(group, d: int):
    """Per subset of dataset d: (subset config, records)."""
    for s, sub in enumerate(group.datasets[d].subsets):
        yield s, sub, [r for r in group.images if r.dataset == d and r.subset == s]


def _bucket_counts(group, d: int) -> dict[tuple[int, int], int]:
    return {b: len(items) for b, items in group.buckets[d].items()}


def _captions_text(records) -> str:
    counts = Counter(r.caption_source for r in records)
    parts = []
    for source, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if source == "class token":
            parts.append(f"{n} use the class token")
        elif source == "none":
            parts.append(f"{n} have no caption")
        else:
            parts.append(f"{n} from {source}")
    return ", ".join(parts) or "-"


def summary(group) -> str:
    lines = []
    for d, config in enumerate(group.datasets):
        w, h = config.resolution
        bucket_text = (f"buckets {config.min_bucket_reso}..{config.max_bucket_reso} step "
                       f"{config.bucket_reso_steps}" + (", no upscale" if config.bucket_no_upscale else "")
                       if config.enable_bucket else "no bucketing (resize and center crop)")
        lines.append(f"Dataset {d + 1} of {len(group.datasets)} ({config.source}): resolution {w}x{h}, "
                     f"batch size {config.batch_size}, {bucket_text}")
        for s, sub, recs in _subset_rows(group, d):
            kind = "reg" if sub.is_reg else "train"
            repeats = str(sub.num_repeats)
            if sub.is_reg:
                used = sum(r.repeats for r in recs)
                repeats += f" (balanced to {used} uses per epoch)"
            lines.append(f"  [{kind}] {sub.image_dir}")
            lines.append(f"      images: {len(recs)}, repeats: {repeats}, class token: "
                         f"{sub.class_tokens or '-'}, captions: {_captions_text(recs)}")
        train = sum(r.repeats for r in group.images if r.dataset == d and not r.is_reg)
        reg = sum(r.repeats for r in group.images if r.dataset == d and r.is_reg)
        lines.append(f"  total per epoch: {train} train images x repeats" +
                     (f" + {reg} reg" if reg else "") + f", {group.num_batches(d)} batches")
        hist = ", ".join(f"{bw}x{bh}: {n}" for (bw, bh), n in _bucket_counts(group, d).items())
        lines.append(f"  buckets (resolution: images x repeats): {hist}")
    lines.append(f"Steps (batches) per epoch: {group.num_batches_per_epoch}")
    return "\n".join(lines)


def bucket_info(group, d: int) -> dict | None:
    """kohya's bucket_info for one dataset, or None when bucketing is off."""
    if not group.datasets[d].enable_bucket:
        return None
    counts = _bucket_counts(group, d)
    errors = [abs(r.placement.ar_error) for r in group.images if r.dataset == d and r.repeats > 0]
    return {
        "buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(counts.items())},
        "mean_img_ar_error": float(sum(errors) / len(errors)) if errors else 0.0,
    }


def _merged_bucket_info(group) -> dict | None:
    infos = [bucket_info(group, d) for d in range(len(group.datasets))]
    infos = [i for i in infos if i is not None]
    if not infos:
        return None
    if len(infos) == 1:
        return infos[0]
    counts: Counter = Counter()
    for info in infos:
        for b in info["buckets"].values():
            counts[tuple(b["resolution"])] += b["count"]
    errors = [abs(r.placement.ar_error) for r in group.images
              if group.datasets[r.dataset].enable_bucket and r.repeats > 0]
    return {"buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
            "mean_img_ar_error": float(sum(errors) / len(errors)) if errors else 0.0}


def _dirs(group, is_reg: bool, d: int | None = None) -> dict:
    out = {}
    for dd in range(len(group.datasets)) if d is None else [d]:
        for _, sub, recs in _subset_rows(group, dd):
            if sub.is_reg == is_reg:
                out[os.path.basename(os.path.normpath(sub.image_dir))] = {
                    "n_repeats": sub.num_repeats, "img_count": len(recs)}
    return out


def _tag_frequency(group, d: int | None = None) -> dict:
    out: dict[str, dict[str, int]] = {}
    for dd in range(len(group.datasets)) if d is None else [d]:
        for _, sub, recs in _subset_rows(group, dd):
            name = os.path.basename(os.path.normpath(sub.image_dir))
            merged = out.setdefault(name, {})
            for tag, n in tag_counts(r.caption for r in recs).items():
                merged[tag] = merged.get(tag, 0) + n
    return out


def metadata(group) -> dict[str, str]:
    first = group.datasets[0]
    sub = first.subsets[0]
    meta = {
        "ss_num_train_images": group.num_train_images,
        "ss_num_reg_images": group.num_reg_images,
        "ss_num_batches_per_epoch": group.num_batches_per_epoch,
        "ss_batch_size_per_device": first.batch_size,
        "ss_resolution": str(tuple(first.resolution)),
        "ss_enable_bucket": bool(first.enable_bucket),
        "ss_min_bucket_reso": first.min_bucket_reso,
        "ss_max_bucket_reso": first.max_bucket_reso,
        "ss_bucket_no_upscale": bool(first.bucket_no_upscale),
        "ss_caption_extension": sub.caption_extension,
        "ss_keep_tokens": sub.keep_tokens,
        "ss_shuffle_caption": bool(sub.shuffle_caption),
        "ss_flip_aug": bool(sub.flip_aug),
        "ss_color_aug": bool(sub.color_aug),
        "ss_random_crop": bool(sub.random_crop),
        "ss_prior_loss_weight": first.prior_loss_weight,
        "ss_dataset_dirs": json.dumps(_dirs(group, False)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(group, True)),
        "ss_tag_frequency": json.dumps(_tag_frequency(group)),
        "ss_bucket_info": json.dumps(_merged_bucket_info(group)),
    }
    if len(group.datasets) > 1 or first.source != "--train_data_dir":
        meta["ss_datasets"] = json.dumps([_dataset_entry(group, d) for d in range(len(group.datasets))])
    return {k: str(v) for k, v in meta.items()}


def _dataset_entry(group, d: int) -> dict:
    """One element of kohya's ss_datasets list (written when a dataset config file is used)."""
    config = group.datasets[d]
    subsets = [{
        "img_count": len(recs), "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
        "flip_aug": sub.flip_aug, "random_crop": sub.random_crop, "shuffle_caption": sub.shuffle_caption,
        "keep_tokens": sub.keep_tokens, "image_dir": os.path.basename(os.path.normpath(sub.image_dir)),
        "class_tokens": sub.class_tokens, "is_reg": sub.is_reg,
    } for _, sub, recs in _subset_rows(group, d)]
    return {
        "is_dreambooth": True,
        "batch_size_per_device": config.batch_size,
        "num_train_images": sum(r.repeats for r in group.images if r.dataset == d and not r.is_reg),
        "num_reg_images": sum(1 for r in group.images if r.dataset == d and r.is_reg),
        "resolution": list(config.resolution),
        "enable_bucket": config.enable_bucket,
        "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso,
        "tag_frequency": _tag_frequency(group, d),
        "bucket_info": bucket_info(group, d),
        "subsets": subsets,
    }

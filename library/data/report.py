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
        elif source == "metadata":
            parts.append(f"{n} from the metadata file")
        else:
            parts.append(f"{n} from {source}")
    return ", ".join(parts) or "-"


def _caption_ops_text(sub) -> str:
    """The caption options in effect for a subset, so a user sees what the model will read."""
    ops = []
    if sub.caption_prefix or sub.caption_suffix:
        ops.append(f"prefix {sub.caption_prefix!r} / suffix {sub.caption_suffix!r}")
    if sub.shuffle_caption:
        ops.append("shuffle" + (f" (keep first {sub.keep_tokens})" if sub.keep_tokens else ""))
    if sub.keep_tokens_separator:
        ops.append(f"fixed parts marked by {sub.keep_tokens_separator!r}")
    if sub.caption_dropout_rate:
        ops.append(f"drop whole caption {sub.caption_dropout_rate:g}")
    if sub.caption_dropout_every_n_epochs:
        ops.append(f"drop all captions every {sub.caption_dropout_every_n_epochs} epoch(s)")
    if sub.caption_tag_dropout_rate:
        ops.append(f"drop tags {sub.caption_tag_dropout_rate:g}")
    if sub.caption_separator != ",":
        ops.append(f"separator {sub.caption_separator!r}")
    if sub.secondary_separator:
        ops.append(f"secondary separator {sub.secondary_separator!r}")
    return ", ".join(ops)


def summary(group) -> str:
    lines = []
    for d, config in enumerate(group.datasets):
        w, h = config.resolution
        bucket_text = (f"buckets {config.min_bucket_reso}..{config.max_bucket_reso} step "
                       f"{config.bucket_reso_steps}" + (", no upscale" if config.bucket_no_upscale else "")
                       if config.enable_bucket else "no bucketing (resize and center crop)")
        if config.metadata_buckets:
            bucket_text = "buckets from the metadata's train_resolution"
        lines.append(f"Dataset {d + 1} of {len(group.datasets)} ({config.source}): resolution {w}x{h}, "
                     f"batch size {config.batch_size}, {bucket_text}")
        for s, sub, recs in _subset_rows(group, d):
            kind = "reg" if sub.is_reg else "train"
            repeats = str(sub.num_repeats)
            if sub.is_reg:
                used = sum(r.repeats for r in recs)
                repeats += f" (balanced to {used} uses per epoch)"
            if sub.metadata_file:
                lines.append(f"  [{kind}] {sub.metadata_file} (images in {sub.image_dir or 'the paths it names'})")
                lines.append(f"      images: {len(recs)}, repeats: {repeats}, captions: {_captions_text(recs)}")
            else:
                lines.append(f"  [{kind}] {sub.image_dir}")
                lines.append(f"      images: {len(recs)}, repeats: {repeats}, class token: "
                             f"{sub.class_tokens or '-'}, captions: {_captions_text(recs)}")
            ops = _caption_ops_text(sub)
            if ops:
                lines.append(f"      caption ops: {ops}")
            if sub.alpha_mask:
                lines.append("      loss mask: the images' alpha channel (opaque = trained)")
            if sub.conditioning_data_dir:
                lines.append(f"      loss mask: mask images in {sub.conditioning_data_dir} (white = trained)")
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
    """kohya's ss_dataset_dirs: folder (or metadata file) name -> repeats and image count."""
    out = {}
    for dd in range(len(group.datasets)) if d is None else [d]:
        for _, sub, recs in _subset_rows(group, dd):
            if sub.is_reg == is_reg:
                out[sub.name] = {"n_repeats": sub.num_repeats, "img_count": len(recs)}
    return out


def _tag_frequency(group, d: int | None = None) -> dict:
    """kohya's tag frequency: per folder, the tags of its captions; for fine-tuning metadata,
    only the "tags" field (kohya does not count free-text captions there)."""
    out: dict[str, dict[str, int]] = {}
    for dd in range(len(group.datasets)) if d is None else [d]:
        for _, sub, recs in _subset_rows(group, dd):
            merged = out.setdefault(sub.name, {})
            texts = [r.tags for r in recs if r.tags] if sub.metadata_file else [r.caption for r in recs]
            for tag, n in tag_counts(texts).items():
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
        "ss_caption_dropout_rate": sub.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": sub.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": sub.caption_tag_dropout_rate,
        "ss_prior_loss_weight": first.prior_loss_weight,
        "ss_dataset_dirs": json.dumps(_dirs(group, False)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(group, True)),
        "ss_tag_frequency": json.dumps(_tag_frequency(group)),
        "ss_bucket_info": json.dumps(_merged_bucket_info(group)),
    }
    if len(group.datasets) > 1 or first.source not in ("--train_data_dir", "--in_json"):
        meta["ss_datasets"] = json.dumps([_dataset_entry(group, d) for d in range(len(group.datasets))])
    return {k: str(v) for k, v in meta.items()}


def _dataset_entry(group, d: int) -> dict:
    """One element of kohya's ss_datasets list (written when a dataset config file is used)."""
    config = group.datasets[d]
    subsets = []
    for _, sub, recs in _subset_rows(group, d):
        entry = {
            "img_count": len(recs), "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
            "flip_aug": sub.flip_aug, "random_crop": sub.random_crop,
            "shuffle_caption": sub.shuffle_caption, "keep_tokens": sub.keep_tokens,
            "keep_tokens_separator": sub.keep_tokens_separator,
            "secondary_separator": sub.secondary_separator, "enable_wildcard": False,
            "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
        }
        if sub.image_dir:
            entry["image_dir"] = os.path.basename(os.path.normpath(sub.image_dir))
        if sub.metadata_file:
            entry["metadata_file"] = os.path.basename(sub.metadata_file)
        else:
            entry.update(class_tokens=sub.class_tokens, is_reg=sub.is_reg)
        subsets.append(entry)
    return {
        "is_dreambooth": not config.is_finetune,
        "batch_size_per_device": config.batch_size,
        "num_train_images": sum(r.repeats for r in group.images if r.dataset == d and not r.is_reg),
        "num_reg_images": sum(group.subset_of(r).num_repeats for r in group.images
                              if r.dataset == d and r.is_reg),
        "resolution": list(config.resolution),
        "enable_bucket": config.enable_bucket,
        "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso,
        "tag_frequency": _tag_frequency(group, d),
        "bucket_info": bucket_info(group, d),
        "subsets": subsets,
    }

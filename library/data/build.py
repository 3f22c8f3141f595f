"""Building a DatasetGroup: scan folders, decode every image once, report all problems together,
balance regularization images, and place images in buckets. Nothing is trained or cached here,
so every input problem surfaces before any GPU time is spent.
"""
from __future__ import annotations

import os

from library.data.buckets import BucketPlanner, Placement
from library.data.config import DatasetConfig
from library.data.group import DatasetGroup, ImageRecord
from library.data.probe import probe_images
from library.data.scan import Findings, scan_dataset
from library.errors import UserError

MAX_LISTED = 40  # problems named in one message; the rest are counted


def _listing(items: list[str]) -> str:
    shown = [f"({i}) {text}" for i, text in enumerate(items[:MAX_LISTED], 1)]
    if len(items) > MAX_LISTED:
        shown.append(f"... and {len(items) - MAX_LISTED} more")
    return " ".join(shown)


def _say(text: str) -> None:
    print(text, flush=True)


def _report_notices(findings: Findings, configs: list[DatasetConfig]) -> None:
    for note in findings.notes:
        _say(note)
    if findings.txt_fallback:
        exts = sorted({s.caption_extension or "(none)" for c in configs for s in c.subsets})
        folders = ", ".join(f"{os.path.basename(f)} ({n})" for f, n in findings.txt_fallback.items())
        _say(f"note: no {'/'.join(exts)} caption files for {sum(findings.txt_fallback.values())} "
             f"image(s), so their .txt captions are used: {folders}. Pass --caption_extension .txt "
             "to make this explicit.")
    if findings.uncaptioned:
        names = ", ".join(os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))
                          for p in findings.uncaptioned[:5])
        more = ", ..." if len(findings.uncaptioned) > 5 else ""
        _say(f"warning: {len(findings.uncaptioned)} image(s) have no caption file, so their folder's "
             f"class token is used as the caption (empty where there is none): {names}{more}.")


def _balance_reg(records: list[ImageRecord], num_train: int) -> None:
    """Give reg images repeats so they add up to the train images x repeats, as kohya does:
    each reg image in order keeps its folder's repeats until the total is reached (later ones
    are unused), then, if still short, they gain one repeat each in turn."""
    reg = [r for r in records if r.is_reg]
    used, total = [], 0
    for rec in reg:
        if total >= num_train:
            rec.repeats = 0
            continue
        used.append(rec)
        total += rec.repeats
    i = 0
    while used and total < num_train:
        used[i % len(used)].repeats += 1
        total += 1
        i += 1


def _metadata_buckets(config: DatasetConfig, scanned, findings: Findings) -> bool:
    """True when fine-tuning metadata gives every image of the dataset a train_resolution: kohya
    then trains each image at that size (prepare_buckets_latents.py computed the buckets)."""
    sizes = [r for sub in scanned for r in sub.train_resolutions]
    if not config.is_finetune or not sizes or any(r is None for r in sizes):
        return False
    if config.bucket_no_upscale:
        findings.error(f"the metadata of {config.source} gives every image a train_resolution (its "
                       "bucket), which cannot be combined with bucket_no_upscale; drop "
                       "--bucket_no_upscale.", config.source)
    if not config.enable_bucket:
        findings.notes.append(f"note: the metadata of {config.source} has train_resolution for every "
                              "image, so those buckets are used (bucketing on, as in kohya).")
        config.enable_bucket = True
    config.metadata_buckets = True
    return True


def build_dataset_group(configs: list[DatasetConfig], seed: int | None = None,
                        skip_bad_images: bool = False, workers: int | None = None) -> DatasetGroup:
    """Check all inputs and build the group; raises one UserError listing every problem."""
    findings = Findings()
    scanned = [scan_dataset(c, findings) for c in configs]
    all_paths = [p for subs in scanned for s in subs for p in s.paths]
    probed = probe_images(all_paths, workers)
    from library.data.masks import match_conditioning

    masks = match_conditioning([s for subs in scanned for s in subs],
                               {p: size for p, (size, _) in probed.items() if size}, findings, workers)
    planners = [BucketPlanner(c.resolution, c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso,
                              c.bucket_reso_steps, c.bucket_no_upscale) for c in configs]

    fixed = [_metadata_buckets(config, subs, findings) for config, subs in zip(configs, scanned)]
    records, bad = [], []
    for d, subs in enumerate(scanned):
        for s, sub in enumerate(subs):
            for path, caption, source, tags, train_reso in zip(sub.paths, sub.captions, sub.sources,
                                                               sub.tags, sub.train_resolutions):
                size, reason = probed[path]
                if size is not None and fixed[d]:
                    # kohya: the image is resized to its precomputed bucket (no crop).
                    placement = Placement(train_reso, train_reso, train_reso[0] / train_reso[1] - size[0] / size[1])
                elif size is not None:
                    try:
                        placement = planners[d].place(size)
                    except ValueError as err:  # only with bucket_no_upscale: a tiny image
                        size, reason = None, f"{err}; with --bucket_no_upscale it fits no bucket"
                if size is None:
                    bad.append((path, reason))
                    continue
                records.append(ImageRecord(path, caption, size, placement, d, s, sub.config.is_reg,
                                           sub.config.num_repeats, source, tags, conditioning=masks.get(path)))

    bad_text = [f"{p}: {why}." for p, why in bad]
    if findings.errors or (bad and not skip_bad_images):
        problems = findings.errors + bad_text
        fixes = []
        if findings.errors:
            fixes.append("fix the folders and files named above")
        if bad:
            fixes.append("replace or delete the bad image files, or pass --skip_bad_images to train "
                         "without them")
        first = (findings.error_paths + [p for p, _ in bad])[0]
        raise UserError(f"the dataset has {len(problems)} problem(s), found before training: "
                        f"{_listing(problems)}", path=first, fix="; ".join(fixes) + ".")
    if bad:
        _say(f"warning: --skip_bad_images: training without {len(bad)} unreadable image file(s): "
             f"{_listing(bad_text)}")
    _report_notices(findings, configs)
    if not records:
        raise UserError("no usable images are left: every image file was skipped as unreadable.",
                        path=bad[0][0] if bad else None,
                        fix="replace the bad image files listed above with working ones.")

    for d, config in enumerate(configs):
        mine = [r for r in records if r.dataset == d]
        num_train = sum(r.repeats for r in mine if not r.is_reg)
        if num_train == 0:
            raise UserError(f"dataset #{d + 1} ({config.source}) has no training images, only "
                            "regularization images (or none).", path=config.source,
                            fix="add a subset with training images (is_reg = false) to that dataset.")
        if any(r.is_reg for r in mine):
            _balance_reg(mine, num_train)

    return DatasetGroup(configs, records, seed=seed)

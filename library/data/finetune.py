"""kohya's fine-tuning metadata: `--in_json FILE` (images in --train_data_dir) or a dataset-config
subset with `metadata_file`.

The file is the JSON that kohya's finetune/merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py
and prepare_buckets_latents.py write:

    {"img001": {"caption": "a photo of ...", "tags": "1girl, solo", "train_resolution": [512, 768]}, ...}

Keys are image paths, or names (without extension) of images in the subset's image_dir. As in
kohya, an image's caption is "caption" followed by the separator and "tags" ("tags" alone when
there is no "caption"). When every image of a dataset has "train_resolution", those sizes are its
buckets and each image is resized to its own, as kohya does (see build.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from library.data.probe import IMAGE_EXTENSIONS
from library.data.scan import Findings, ScannedSubset

# kohya looks for <image_dir>/<key><ext> with each extension in both cases.
_LOOKUP_EXTENSIONS = tuple(e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper()))


def read_metadata(path: Path, findings: Findings) -> dict | None:
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        findings.error(f"the fine-tuning metadata file {path} {what} (--in_json / metadata_file).", path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        findings.error(f"the metadata file {path} is not UTF-8 text; re-save it as UTF-8.", path)
        return None
    except json.JSONDecodeError as err:
        findings.error(f"the metadata file {path} is not valid JSON ({err}).", path)
        return None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        findings.error(f"the metadata file {path} must be a JSON object of image keys to objects like "
                       '{"caption": "...", "tags": "..."} (kohya\'s fine-tuning metadata).', path)
        return None
    if not data:
        findings.error(f"the metadata file {path} has no image entries.", path)
        return None
    return data


def find_image(key: str, image_dir: str | None) -> str | None:
    """kohya's lookup: the key itself if it is a file, else <image_dir>/<key><image extension>."""
    if os.path.isfile(key):
        return key
    if not image_dir:
        return None
    candidates = [os.path.join(image_dir, key)] if key.lower().endswith(IMAGE_EXTENSIONS) else []
    candidates += sorted(os.path.join(image_dir, key + ext) for ext in _LOOKUP_EXTENSIONS)
    return next((c for c in candidates if os.path.isfile(c)), None)


def _train_resolution(value) -> tuple[int, int] | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def scan_metadata_subset(sub, findings: Findings) -> ScannedSubset:
    result = ScannedSubset(config=sub)
    path = Path(sub.metadata_file)
    data = read_metadata(path, findings)
    if data is None:
        return result
    if sub.image_dir and not os.path.isdir(sub.image_dir):
        findings.error(f"the image folder {sub.image_dir} for the metadata file {path} does not exist.",
                       sub.image_dir)
        return result
    missing = []
    for key, entry in data.items():
        image = find_image(key, sub.image_dir)
        if image is None:
            missing.append(key)
            continue
        caption, tags = entry.get("caption"), entry.get("tags")
        if caption is None:  # kohya: tags alone are the caption
            caption, tags = tags, None
        bad = [n for n, v in (("caption", caption), ("tags", tags)) if v is not None and not isinstance(v, str)]
        if bad:
            findings.error(f"'{bad[0]}' of '{key}' in {path} must be a string.", path)
            continue
        if tags:
            caption = caption + sub.caption_separator + tags
        resolution = entry.get("train_resolution")
        train_resolution = _train_resolution(resolution)
        if resolution is not None and train_resolution is None:
            findings.error(f"'train_resolution' of '{key}' in {path} must be [width, height], multiples of "
                           f"8; got {resolution!r}.", path)
            continue
        result.add(image, caption or "", "metadata" if caption else "none", tags=tags,
                   train_resolution=train_resolution)
    if missing:
        where = f"in {sub.image_dir}" if sub.image_dir else "(no --train_data_dir / image_dir given)"
        shown = ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        findings.error(f"{len(missing)} image(s) of the metadata file {path} were not found {where}: "
                       f"{shown}; keys are image paths or image names without extension", path)
    return result

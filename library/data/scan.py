"""Finding images and captions on disk, collecting every problem instead of stopping at the first.

The scanner never raises: it records problems in a `Findings`, and the group builder raises one
UserError listing them all, so a user fixes the whole dataset in one go.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.data.config import REPEATS_DIR_RE, DatasetConfig, SubsetConfig
from library.data.probe import IMAGE_EXTENSIONS, is_image_file

FALLBACK_CAPTION_EXTENSION = ".txt"


@dataclass
class ScannedSubset:
    config: SubsetConfig
    paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    # Where each caption came from: an extension, or "class token" / "none" / "metadata".
    sources: list[str] = field(default_factory=list)
    # Fine-tuning metadata only: each image's "tags" (for ss_tag_frequency, as kohya counts them)
    # and "train_resolution" (its precomputed bucket); None elsewhere.
    tags: list[str | None] = field(default_factory=list)
    train_resolutions: list[tuple[int, int] | None] = field(default_factory=list)

    def add(self, path: str, caption: str, source: str, tags: str | None = None,
            train_resolution: tuple[int, int] | None = None) -> None:
        self.paths.append(path)
        self.captions.append(caption)
        self.sources.append(source)
        self.tags.append(tags)
        self.train_resolutions.append(train_resolution)


@dataclass
class Findings:
    """Problems and notices from scanning; reported together by the builder."""

    errors: list[str] = field(default_factory=list)          # each one sentence naming a path
    error_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    txt_fallback: dict[str, int] = field(default_factory=dict)  # folder -> captions read from .txt
    uncaptioned: list[str] = field(default_factory=list)     # train images given the class token

    def error(self, message: str, path) -> None:
        self.errors.append(message)
        self.error_paths.append(str(path))


def list_images(folder: str) -> list[str]:
    """Image files directly inside `folder`, sorted by name so every run sees the same order."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if is_image_file(e.name) and e.is_file()]
    return [os.path.join(folder, n) for n in sorted(names)]


def read_caption(path: Path, findings: Findings, all_lines: bool = False) -> str | None:
    """The first non-empty line of a caption file (with `all_lines`, kohya's enable_wildcard: every
    non-empty line, joined by newlines); None for an empty file or undecodable text."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Windows editors add a BOM
    except UnicodeDecodeError:
        findings.error(f"caption {path} is not UTF-8 text; re-save it as UTF-8 (in most editors: "
                       "Save As, encoding UTF-8).", path)
        return None
    except OSError as err:
        findings.error(f"caption {path} cannot be read ({err.strerror or err}).", path)
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    return "\n".join(lines) if all_lines else lines[0]


def suggest_folder_name(name: str) -> str:
    """A <repeats>_<name> spelling for a misnamed folder: "10 dog" or "dog_10" -> "10_dog"."""
    m = re.match(r"^(\d+)[\s\-.]+(.+)$", name) or re.match(r"^(.+?)[\s_\-.]+(\d+)$", name)
    if m:
        a, b = m.groups()
        return f"{a}_{b}" if a.isdigit() else f"{b}_{a}"
    return f"10_{name}"


def _has_images(folder: Path) -> bool:
    try:
        return bool(list_images(str(folder)))
    except OSError:
        return False


def _check_dreambooth_root(root: str | None, flag: str, findings: Findings, required: bool) -> None:
    """Explain what is wrong with a --train_data_dir / --reg_data_dir folder layout."""
    if not root:
        return
    base = Path(root)
    if not base.exists():
        findings.error(f"the folder given by {flag} does not exist: {base}.", base)
        return
    if not base.is_dir():
        findings.error(f"{flag} must be a folder, but {base} is a file.", base)
        return
    entries = sorted(base.iterdir(), key=lambda p: p.name)
    loose = [p for p in entries if p.is_file() and is_image_file(p.name)]
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    good = []
    for d in dirs:
        m = REPEATS_DIR_RE.match(d.name)
        if not m:
            findings.error(f"the folder {d} is not named <repeats>_<class tokens>; rename '{d.name}' to "
                           f"e.g. '{suggest_folder_name(d.name)}' (repeats per epoch, an underscore, "
                           "then the class token).", d)
        elif int(m.group(1)) < 1:
            findings.notes.append(f"note: {d} has 0 repeats and is skipped (as kohya does).")
        else:
            good.append(d)
    if loose and not good:
        if REPEATS_DIR_RE.match(base.name):
            findings.error(f"{flag} points at the image folder {base} itself: it must point at the "
                           f"folder that contains it. Pass {flag} {base.parent} instead.", base)
        else:
            findings.error(f"the images in {base} must be inside a subfolder named "
                           f"<repeats>_<class tokens>: move them to e.g. {base / ('10_' + base.name)} "
                           f"and keep passing {flag} {base}.", base)
    elif loose:
        findings.notes.append(f"note: {len(loose)} image(s) directly inside {base} are ignored; only "
                              f"its <repeats>_<name> subfolders are used.")
    elif not dirs and required:
        findings.error(f"the folder given by {flag} is empty: {base}. It must hold subfolders like "
                       "10_dog with the images inside.", base)


def _caption_for(image: str, sub: SubsetConfig, findings: Findings) -> tuple[str | None, str]:
    base = os.path.splitext(image)[0]
    ext = sub.caption_extension
    exts = [ext] + ([FALLBACK_CAPTION_EXTENSION] if ext != FALLBACK_CAPTION_EXTENSION else [])
    for i, e in enumerate(exts):
        cap_path = Path(base + e)
        if e and cap_path.is_file():
            caption = read_caption(cap_path, findings, all_lines=sub.enable_wildcard)
            if caption is not None:
                if i > 0:
                    folder = sub.image_dir
                    findings.txt_fallback[folder] = findings.txt_fallback.get(folder, 0) + 1
                return caption, e
            break  # an empty caption file counts as no caption; don't look further
    return None, ""


def scan_subset(sub: SubsetConfig, findings: Findings) -> ScannedSubset:
    result = ScannedSubset(config=sub)
    folder = Path(sub.image_dir)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        findings.error(f"the image folder {folder} {what}.", folder)
        return result
    try:
        paths = list_images(str(folder))
    except OSError as err:
        findings.error(f"the image folder {folder} cannot be read ({err.strerror or err}).", folder)
        return result
    if not paths:
        kind = "regularization" if sub.is_reg else "training"
        nested = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and _has_images(d)]
        hint = (f" (images inside its subfolder(s) {', '.join(nested[:3])} are not read: move them up "
                "one level)" if nested else "")
        findings.error(f"the {kind} folder {folder} has no images "
                       f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}){hint}.", folder)
        return result
    for image in paths:
        caption, source = _caption_for(image, sub, findings)
        if caption is None:
            if not sub.is_reg:  # reg images normally have no captions: the class token is the point
                findings.uncaptioned.append(image)
            caption, source = (sub.class_tokens, "class token") if sub.class_tokens else ("", "none")
        result.add(image, caption, source)
    return result


def scan_dataset(config: DatasetConfig, findings: Findings) -> list[ScannedSubset]:
    _check_dreambooth_root(config.train_data_dir, "--train_data_dir", findings, required=True)
    _check_dreambooth_root(config.reg_data_dir, "--reg_data_dir", findings, required=False)
    if config.train_data_dir and not findings.errors and not any(not s.is_reg for s in config.subsets):
        findings.error(f"no <repeats>_<name> subfolders with images in {config.train_data_dir}.",
                       config.train_data_dir)
    if config.is_finetune:
        from library.data.finetune import scan_metadata_subset

        return [scan_metadata_subset(sub, findings) for sub in config.subsets]
    return [scan_subset(sub, findings) for sub in config.subsets]

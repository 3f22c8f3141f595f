"""WD14-style image tagger: an ONNX classifier with one sigmoid output per tag, and its tag CSV.

The model folder is the user's (e.g. a copy of SmilingWolf/wd-v1-4-convnext-tagger-v2): it must hold
`model.onnx` and `selected_tags.csv` (header `tag_id,name,category,count`; category 9 = rating,
0 = general, 4 = character). Nothing is downloaded.

Input as these models expect it: the image in BGR order, padded to a square with white, resized to
the model's input size (read from the model), float32 0..255, NHWC. Tag selection follows kohya's
tag_images_by_wd14_tagger.py: general and character tags by their thresholds, the rating by argmax,
undesired tags dropped, optional reordering (character tags first, rating first or last, tags that
always go first).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from library.dataprep.images import open_rgb
from library.errors import UserError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = "9", "0", "4"


@dataclass
class TagCatalog:
    """The CSV's tags in model-output order, with each one's category."""
    names: list[str]
    categories: list[str]

    @classmethod
    def read(cls, path: Path) -> "TagCatalog":
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except UnicodeDecodeError:
            raise UserError(f"the tag list {path} is not UTF-8 text.", path=path,
                            fix="use the selected_tags.csv that came with the tagger model.") from None
        if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
            raise UserError(f"the tag list {path} does not start with the header "
                            "'tag_id,name,category,count' of a WD14 tagger's selected_tags.csv.", path=path,
                            fix="use the selected_tags.csv that came with the tagger model.")
        body = [r for r in rows[1:] if r]
        bad = [i + 2 for i, r in enumerate(body) if len(r) < 3 or r[2].strip() not in (RATING, GENERAL, CHARACTER)]
        if bad:
            raise UserError(f"the tag list {path} has rows without a known category (9, 0 or 4) on "
                            f"line(s) {bad[:5]}.", path=path,
                            fix="use the selected_tags.csv that came with the tagger model.")
        return cls([r[1] for r in body], [r[2].strip() for r in body])

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class TagOptions:
    """kohya's tagger flags, resolved (thresholds already defaulted to --thresh)."""
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: set[str] = field(default_factory=set)
    remove_underscore: bool = False
    character_tag_expand: bool = False
    tag_replacement: str | None = None
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    character_tags_first: bool = False
    always_first_tags: list[str] = field(default_factory=list)
    caption_separator: str = ", "


def display_names(catalog: TagCatalog, opts: TagOptions) -> list[str]:
    """The tag names as they will be written: underscores, character expansion, replacements."""
    names = list(catalog.names)
    for i, (name, cat) in enumerate(zip(names, catalog.categories)):
        if opts.character_tag_expand and cat == CHARACTER and name.endswith(")"):
            # "name_(series)" -> "name, series"; "name_(costume)_(series)" -> "name_(costume), series"
            head, _, series = name.rpartition("(")
            name = head[:-1] if head.endswith("_") else head
            name = name + opts.caption_separator + series[:-1]
        if opts.remove_underscore and len(name) > 3:  # short tags like ^_^ are emoticons
            name = name.replace("_", " ")
        names[i] = name
    for source, target in parse_tag_replacement(opts.tag_replacement):
        if source in names:
            names[names.index(source)] = target
    return names


def parse_tag_replacement(text: str | None) -> list[tuple[str, str]]:
    """`a,b;c,d` -> [(a, b), (c, d)]; `\\,` and `\\;` stand for a literal comma / semicolon."""
    if not text:
        return []
    pairs = []
    for item in text.replace("\\,", "\0c").replace("\\;", "\0s").split(";"):
        parts = item.split(",")
        if len(parts) != 2:
            raise UserError(f"--tag_replacement entry {item.replace(chr(0) + 'c', ',')!r} is not "
                            "'source,target'.", fix="write pairs as `source1,target1;source2,target2` "
                            "and escape a comma or semicolon inside a tag as \\, or \\;.")
        pairs.append(tuple(p.replace("\0c", ",").replace("\0s", ";") for p in parts))
    return pairs


def select_tags(probs: np.ndarray, catalog: TagCatalog, opts: TagOptions,
                names: list[str] | None = None) -> list[str]:
    """The tags of one image, in the order they are written."""
    names = display_names(catalog, opts) if names is None else names
    general, characters = [], []
    for i, (p, cat) in enumerate(zip(probs, catalog.categories)):
        if cat == GENERAL and p >= opts.general_threshold:
            general.append(names[i])
        elif cat == CHARACTER and p >= opts.character_threshold:
            characters.append(names[i])
    general = [t for t in general if t not in opts.undesired_tags]
    characters = [t for t in characters if t not in opts.undesired_tags]
    # kohya inserts each character tag at the front in turn, so with character_tags_first they
    # come out in reverse model order.
    tags = characters[::-1] + general if opts.character_tags_first else general + characters
    if opts.use_rating_tags or opts.use_rating_tags_as_last_tag:
        ratings = [i for i, cat in enumerate(catalog.categories) if cat == RATING]
        if ratings:
            rating = names[max(ratings, key=lambda i: probs[i])]
            if rating not in opts.undesired_tags:
                tags = [rating] + tags if opts.use_rating_tags else tags + [rating]
    for tag in opts.always_first_tags:
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def preprocess(image, size: int) -> np.ndarray:
    """RGB PIL image -> BGR float32 HxWx3 at `size`, padded square with white as the tagger was trained."""
    arr = np.asarray(image)[:, :, ::-1]
    side = max(arr.shape[:2])
    pad_y, pad_x = side - arr.shape[0], side - arr.shape[1]
    arr = np.pad(arr, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
                 constant_values=255)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LANCZOS4
    arr = cv2.resize(np.ascontiguousarray(arr), (size, size), interpolation=interpolation)
    return arr.astype(np.float32)


def find_model_files(model_dir: str | os.PathLike, repo_id: str | None = None) -> tuple[Path, Path]:
    """model.onnx and selected_tags.csv in `model_dir`, or in kohya's `model_dir/<repo_id with _>`."""
    model_dir = Path(model_dir)
    places = [model_dir] + ([model_dir / repo_id.replace("/", "_")] if repo_id else [])
    for place in places:
        if (place / MODEL_FILE).is_file() and (place / TAGS_FILE).is_file():
            return place / MODEL_FILE, place / TAGS_FILE
    missing = [str(p / f) for p in places for f in (MODEL_FILE, TAGS_FILE) if not (p / f).is_file()]
    raise UserError(f"no WD14 tagger model in {model_dir}: missing {', '.join(missing)}.", path=model_dir,
                    fix=f"pass --model_dir with the folder holding the tagger's {MODEL_FILE} and "
                        f"{TAGS_FILE} (for example a copy of SmilingWolf/wd-v1-4-convnext-tagger-v2; "
                        "this toolkit never downloads).")


class Tagger:
    """An ONNX tagger session with its catalog; `predict` yields (path, probabilities) per image."""

    def __init__(self, model_path: Path, catalog: TagCatalog, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("tagging needs the onnxruntime package.",
                            fix="pip install onnxruntime (or onnxruntime-gpu on a CUDA machine).") from None
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(model_path), providers=providers)
        except Exception as err:
            raise UserError(f"the tagger model {model_path} cannot be loaded ({err}).", path=model_path,
                            fix="check that the file is a complete ONNX model (re-copy it).") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape  # [batch, height, width, 3]
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise UserError(f"the tagger model {model_path} takes input {shape}, not the WD14 layout "
                            "[batch, size, size, 3].", path=model_path, fix="use a WD14-style tagger model.")
        self.size = int(shape[1])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(catalog):
            raise UserError(f"the tagger model {model_path} has {outputs} outputs but its tag list has "
                            f"{len(catalog)} tags: they do not belong together.", path=model_path,
                            fix=f"use the {TAGS_FILE} that came with this model.")
        self.catalog = catalog
        self.model_path = model_path

    def predict(self, paths: list[Path], batch_size: int = 1, on_error=None):
        """Yield (path, probabilities) per readable image; call on_error(path, reason) for the rest."""
        batch_size = self.fixed_batch or max(1, batch_size)
        batch: list[tuple[Path, np.ndarray]] = []

        def run(items):
            probs = self.session.run(None, {self.input_name: np.stack([a for _, a in items])})[0]
            return [(p, pr) for (p, _), pr in zip(items, probs)]

        for path in paths:
            image, reason = open_rgb(path)
            if image is None:
                if on_error:
                    on_error(path, reason)
                continue
            batch.append((path, preprocess(image, self.size)))
            if len(batch) == batch_size:
                yield from run(batch)
                batch = []
        if batch:
            yield from run(batch)


def load_tagger(model_dir, repo_id: str | None = None) -> Tagger:
    model_path, csv_path = find_model_files(model_dir, repo_id)
    return Tagger(model_path, TagCatalog.read(csv_path))


@dataclass
class TagRun:
    """What a tagging run did: captions written, images skipped with the reason, tag frequencies."""
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    frequencies: dict[str, int] = field(default_factory=dict)


def tag_images(tagger: Tagger, paths: list[Path], opts: TagOptions, caption_extension: str = ".txt",
               append_tags: bool = False, batch_size: int = 1, progress=None) -> TagRun:
    """Tag every image and write its caption file atomically; unreadable images are listed, not fatal.

    With `append_tags` new tags go after the existing caption's tags, without repeats (kohya).
    A caption file in a bad encoding is reported and left as it is.
    """
    from library.dataprep.captions import (CaptionEncodingError, caption_path, read_caption, split_tags,
                                           write_caption)

    run = TagRun()
    names = display_names(tagger.catalog, opts)
    sep = opts.caption_separator
    done = 0
    for path, probs in tagger.predict(paths, batch_size, on_error=lambda p, why: run.failed.append((p, why))):
        tags = select_tags(probs, tagger.catalog, opts, names)
        target = caption_path(path, caption_extension)
        if append_tags:
            try:
                existing = split_tags(read_caption(target), sep)
            except CaptionEncodingError as err:
                run.failed.append((path, str(err)))
                continue
            tags = existing + [t for t in tags if t not in existing]
        write_caption(target, sep.join(tags))
        run.written.append(target)
        for tag in tags:
            run.frequencies[tag] = run.frequencies.get(tag, 0) + 1
        done += 1
        if progress:
            progress(done + len(run.failed), len(paths), path, tags)
    return run

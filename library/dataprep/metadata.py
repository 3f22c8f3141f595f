"""kohya's fine-tuning metadata JSON (what `--in_json` reads): building it from caption files and
cleaning it.

    {"img001": {"caption": "a girl standing in a field", "tags": "1girl, solo, outdoors"}, ...}

Keys are image names without extension (images in --train_data_dir), or full paths with
--full_path (needed for --recursive, since names may repeat across folders). Captions go under
"caption" (merge_captions_to_metadata.py), tagger output under "tags" (merge_dd_tags_to_metadata.py);
training joins the two.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from library.dataprep.captions import CaptionEncodingError, caption_path, read_caption
from library.errors import UserError
from library.fileio import write_json_atomic


def load_metadata(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"the metadata file {path} does not exist.", path=path,
                        fix="pass an existing metadata JSON, or leave --in_json out to start a new one.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"the metadata file {path} is not valid UTF-8 JSON ({err}).", path=path,
                        fix="pass a metadata JSON written by merge_captions_to_metadata.py or "
                            "merge_dd_tags_to_metadata.py.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"the metadata file {path} is not a JSON object of image keys to objects.", path=path,
                        fix="pass a metadata JSON written by merge_captions_to_metadata.py or "
                            "merge_dd_tags_to_metadata.py.")
    return data


def merge_files(images: list[Path], field: str, extension: str, full_path: bool,
                metadata: dict | None = None) -> tuple[dict, list[Path]]:
    """Put each image's caption file text under `field`; return (metadata, images without a file).

    A caption file that is not UTF-8 stops the merge before anything is written.
    """
    metadata = {} if metadata is None else metadata
    missing, unreadable = [], []
    for image in images:
        path = caption_path(image, extension)
        if not path.is_file():
            missing.append(image)
            continue
        try:
            text = read_caption(path).strip()
        except CaptionEncodingError as err:
            unreadable.append(err.path)
            continue
        key = str(image) if full_path else image.stem
        metadata.setdefault(key, {})[field] = text
    if unreadable:
        raise UserError(f"{len(unreadable)} caption file(s) are not UTF-8 text: "
                        f"{', '.join(map(str, unreadable[:10]))}. Nothing was written.",
                        fix="re-save them as UTF-8 (in most editors: Save As, encoding UTF-8) and run again.")
    return metadata, missing


def write_metadata(path: str | Path, metadata: dict) -> None:
    write_json_atomic(path, metadata)


# --- cleaning (the rules of kohya's clean_captions_and_tags.py) ------------------------------------

_HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
_HAIR_CUT = re.compile(r", (bob|hime) cut, ")
_HAIR = re.compile(r", ([\w\-]+) hair, ")
_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
# With several people in a picture, per-person attributes that disagree are dropped.
_MULTI_PERSON_ATTRIBUTES = [
    _HAIR_LENGTH, _HAIR_CUT, re.compile(r", [\w\-]+ eyes, "), re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|"
               r"two tails|[\w\-]+ braid|sidelocks), "),
]
# Applied in order, each until the text stops changing.
CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"),
    ("cartoon women", "girls"), ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"),
    ("anime character", "girl"), ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"),
    ("female", "girl"), ("woman", "girl"), ("women", "girls"), ("people", "girls"), ("person", "girl"),
    ("a cartoon figure", "a figure"), ("a cartoon image", "an image"), ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"), ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
]


def clean_tags(tags: str) -> str:
    """Underscores to spaces (the ^_^ emoticon kept), a DeepDanbooru rating tail cut, attributes that
    conflict between several people dropped, and a tag dropped where a longer tag ends with it
    ("shirt" beside "white shirt")."""
    tags = tags.replace("^_^", "\0").replace("_", " ").replace("\0", "^_^")
    tags = tags.split(", rating")[0]
    # Every tag wrapped as ", tag, " so that patterns can match whole tags next to each other.
    text = ", " + tags.replace(", ", ", , ") + ", "
    if "girls" in text or "boys" in text:
        for pattern in _MULTI_PERSON_ATTRIBUTES:
            if len(pattern.findall(text)) > 1:
                text = pattern.sub("", text)
        length = _HAIR_LENGTH.search(text)  # one shared hair length is kept through the hair-colour rule
        if length:
            text = _HAIR_LENGTH.sub(", \0, ", text)
        if len(_HAIR.findall(text)) > 1:
            text = _HAIR.sub("", text)
        if length:
            text = text.replace(", \0, ", length.group())
    for word in _WORD.findall(text):
        if re.search(rf", ((\w+) )+{re.escape(word)}, ", text):
            text = text.replace(f", {word}, ", "")
    text = text.replace(", , ", ", ")
    return text[2:-2]


def clean_caption(caption: str) -> str:
    for old, new in CAPTION_REPLACEMENTS:
        while old in caption:
            caption = caption.replace(old, new)
    return caption


def clean_metadata(metadata: dict) -> list[str]:
    """Clean every entry's "tags" and "caption" in place; return the keys lacking either."""
    notes = []
    for key, entry in metadata.items():
        if entry.get("tags") is not None:
            entry["tags"] = clean_tags(entry["tags"])
        else:
            notes.append(f"{key}: no tags")
        if entry.get("caption") is not None:
            entry["caption"] = clean_caption(entry["caption"])
        else:
            notes.append(f"{key}: no caption")
    return notes

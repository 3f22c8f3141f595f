"""Caption files: reading them without ever destroying one, writing them atomically, and the
folder-wide tag operations of the caption editor.

A caption file that is not UTF-8 (say, saved as Shift-JIS or UTF-16 by another tool) is reported
and left untouched: rewriting it from a wrong decoding would lose the user's text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from library.data.transforms import split_fixed_tags
from library.fileio import write_text_atomic

TAG_SEPARATOR = ","


class CaptionEncodingError(Exception):
    """A caption file that is not UTF-8 text; it must not be rewritten."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"{path} is not UTF-8 text; it was left as it is. Re-save it as UTF-8 "
                         "(in most editors: Save As, encoding UTF-8) to edit it here.")


def caption_path(image: str | os.PathLike, extension: str) -> Path:
    """The caption file beside an image: photo.png + ".txt" -> photo.txt (kohya's rule)."""
    if not extension.startswith("."):
        extension = "." + extension
    return Path(image).with_suffix(extension)


def read_caption(path: str | os.PathLike) -> str:
    """The file's text without the trailing newline; "" when there is no file.

    Raises CaptionEncodingError for a file that is not UTF-8 (a BOM is accepted).
    """
    path = Path(path)
    if not path.exists():
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise CaptionEncodingError(path) from None


def write_caption(path: str | os.PathLike, text: str) -> None:
    """Write a caption atomically (never half a file), with one trailing newline as kohya writes."""
    write_text_atomic(path, text.rstrip("\r\n") + "\n")


def split_tags(caption: str, separator: str = TAG_SEPARATOR) -> list[str]:
    return [t.strip() for t in caption.split(separator.strip() or separator) if t.strip()]


def join_tags(tags: list[str], separator: str = TAG_SEPARATOR) -> str:
    """"a, b, c" for the separator "," or ", " (kohya writes tags with a space after the comma)."""
    sep = separator.strip()
    return (sep + " ").join(tags) if sep else separator.join(tags)


def keep_tokens_preview(caption: str, keep_tokens: int = 0, keep_tokens_separator: str = "",
                        separator: str = TAG_SEPARATOR) -> tuple[list[str], list[str], list[str]]:
    """Which tags stay fixed in training and which shuffle/drop: (fixed, shuffled, fixed suffix)."""
    return split_fixed_tags(caption, keep_tokens, separator, keep_tokens_separator)


@dataclass
class FolderCaptions:
    """The captions of a folder's images: what the editor shows and edits.

    `unreadable` lists caption files that are not UTF-8: they are counted nowhere and never written.
    """
    images: list[Path]
    extension: str = ".txt"
    separator: str = TAG_SEPARATOR
    unreadable: list[Path] = field(default_factory=list)

    def caption_file(self, image: Path) -> Path:
        return caption_path(image, self.extension)

    def read(self, image: Path) -> str:
        return read_caption(self.caption_file(image))

    def tag_counts(self) -> dict[str, int]:
        """Tag -> number of captions holding it, most frequent first (ties by name)."""
        counts: dict[str, int] = {}
        self.unreadable = []
        for image in self.images:
            try:
                tags = split_tags(self.read(image), self.separator)
            except CaptionEncodingError as err:
                self.unreadable.append(err.path)
                continue
            for tag in dict.fromkeys(tags):  # a tag written twice in one caption counts once
                counts[tag] = counts.get(tag, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def _edit_all(self, edit) -> int:
        """Apply edit(tags) -> tags to every readable caption; return how many files changed."""
        changed = 0
        self.unreadable = []
        for image in self.images:
            path = self.caption_file(image)
            try:
                text = read_caption(path)
            except CaptionEncodingError as err:
                self.unreadable.append(err.path)
                continue
            tags = split_tags(text, self.separator)
            new = edit(list(tags))
            if new != tags:
                write_caption(path, join_tags(new, self.separator))
                changed += 1
        return changed

    def add_tag(self, tag: str, first: bool = False) -> int:
        """Add `tag` to every caption lacking it (at the start with `first`, else at the end)."""
        tag = tag.strip()

        def edit(tags):
            if tag in tags:
                return tags
            return [tag] + tags if first else tags + [tag]
        return self._edit_all(edit) if tag else 0

    def remove_tag(self, tag: str) -> int:
        tag = tag.strip()
        return self._edit_all(lambda tags: [t for t in tags if t != tag])

    def replace_tag(self, old: str, new: str) -> int:
        """Rename a tag everywhere; where the new name is already present the old one just goes."""
        old, new = old.strip(), new.strip()
        if not new:
            return self.remove_tag(old)

        def edit(tags):
            if old not in tags:
                return tags
            out = []
            for t in tags:
                t = new if t == old else t
                if t not in out:
                    out.append(t)
            return out
        return self._edit_all(edit)

    def search(self, text: str) -> list[Path]:
        """Images whose caption contains `text` (case-insensitive)."""
        text = text.lower()
        hits = []
        for image in self.images:
            try:
                if text in self.read(image).lower():
                    hits.append(image)
            except CaptionEncodingError:
                continue
        return hits

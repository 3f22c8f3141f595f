"""The CLIP BPE tokenizer of Stable Diffusion, loaded from files shipped in this repository.

`clip_tokenizer/` holds `vocab.json` and `merges.txt` (built by tools/build_clip_tokenizer.py from
the BPE list in open-clip-torch) and one folder of config files per kind:

- "sd1": SD 1.x (CLIP ViT-L/14) pads with `<|endoftext|>` (id 49407).
- "sd2": SD 2.x (OpenCLIP ViT-H/14) pads with `!` (id 0), as open_clip and SD 2.x's tokenizer do.

The returned tokenizer is transformers' `CLIPTokenizer` (in transformers 5 there is only the
fast, `tokenizers`-backed class), changed by `match_reference` so that its ids match open_clip's
reference tokenizer, the one CLIP and Stable Diffusion were trained with:

- The clean-up the reference does before tokenizing (ftfy, then html.unescape twice) is done by
  extra normalizers: common HTML entities, typographic quotes, Latin ligatures, full/half-width
  forms, Windows-1252 leftovers, terminal colour codes and control characters, and Python's
  final-sigma lower-casing.
- Special-token text typed in a prompt ("<|endoftext|>", or "!" for sd2) is tokenized as plain
  text, as the reference does; transformers would turn it into the special id (for SD 2.x's `!`
  pad token that is diffusers issue #4153).

Known gaps, all rare in prompts: ftfy's mojibake repair ("cafÃ©" -> "café"), HTML entities not
in HTML_ENTITIES, and characters newer than the Unicode tables of the `tokenizers` regex engine.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import unicodedata
from pathlib import Path

from library.errors import UserError
from library.fileio import atomic_path

DATA_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
KINDS = ("sd1", "sd2")
MAX_LENGTH = 77
SHARED_FILES = ("vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
REBUILD = ("pip download --no-deps open-clip-torch -d /tmp/oc && "
           "python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl")

# Entities are undone twice (html.unescape runs twice in the reference), "&amp;" first so that
# "&amp;lt;" ends as "<" like it does there. Only the entities seen in real captions are listed.
HTML_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&nbsp;": "\xa0",
                 "&#39;": "'", "&#039;": "'", "&#x27;": "'", "&#34;": '"', "&#x22;": '"'}
# ftfy's tables: terminal colour codes and control characters it drops, ligatures it splits,
# quotes it straightens.
TERMINAL_ESCAPES = r"\x1b\[[0-9;]*[a-zA-Z]"
CONTROL_CHARS = "[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]"
LIGATURES = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
             "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj",
             "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt",
             "ﬆ": "st"}
SINGLE_QUOTES = "[\u02bc\u2018-\u201b]"
DOUBLE_QUOTES = "[\u201c-\u201f]"
# Python's str.lower() (used by the reference) writes a capital sigma that ends a word as "ς";
# the Lowercase normalizer always writes "σ", so word-final ones are rewritten first. Unicode's
# rule: a cased letter before it and none after it, skipping "case-ignorable" characters.
_CASED = r"[\p{Lu}\p{Ll}\p{Lt}]"
_IGNORABLE = (r"[\p{Mn}\p{Me}\p{Cf}\p{Lm}\p{Sk}'.:\x{b7}\x{387}\x{55f}\x{5f4}\x{2018}\x{2019}"
              r"\x{2024}\x{2027}\x{fe13}\x{fe52}\x{fe55}\x{ff07}\x{ff0e}\x{ff1a}]")
FINAL_SIGMA = f"(?<={_CASED}{_IGNORABLE}*)Σ(?!{_IGNORABLE}*{_CASED})"
# How CLIP splits text before BPE: words, single digits, runs of other symbols.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"Unknown CLIP tokenizer kind {kind!r}.",
                        fix=f"Use one of: {', '.join(KINDS)}.")
    return kind


def tokenizer_dir(kind: str = "sd1") -> Path:
    """The shipped folder: `vocab.json`, `merges.txt` and a `<kind>/` folder of configs.

    It is not itself a `tokenizer/` folder; use `tokenizer_files` or `copy_tokenizer_files`.
    """
    _check_kind(kind)
    return DATA_DIR


def tokenizer_files(kind: str = "sd1") -> dict[str, Path]:
    """The four files of a complete `tokenizer/` folder for `kind`: file name -> shipped path."""
    _check_kind(kind)
    files = {name: DATA_DIR / name for name in SHARED_FILES}
    files.update({name: DATA_DIR / kind / name for name in CONFIG_FILES})
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"The CLIP tokenizer files are missing ({', '.join(missing)}): the "
                        f"install is incomplete.", path=missing[0],
                        fix=f"Reinstall from the repository, or rebuild them: {REBUILD}")
    return files


def copy_tokenizer_files(kind: str, dest: str | os.PathLike) -> Path:
    """Write the standard CLIP tokenizer files for `kind` into `dest` (e.g. a diffusers
    model's `tokenizer/`), so transformers and other tools can load it from there."""
    dest = Path(dest)
    for name, src in tokenizer_files(kind).items():
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(src, tmp)
    return dest


@functools.lru_cache(maxsize=None)
def _read_data() -> tuple[dict[str, int], list[tuple[str, str]]]:
    files = tokenizer_files("sd1")
    try:
        vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
        lines = files["merges.txt"].read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as err:
        raise UserError(f"The CLIP tokenizer files in {DATA_DIR} cannot be read ({err}).",
                        path=DATA_DIR, fix=f"Rebuild them: {REBUILD}") from err
    # The first line is the "#version" header.
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    if len(vocab) != 49408 or len(merges) != 48894:
        raise UserError(f"The CLIP tokenizer files in {DATA_DIR} are damaged ({len(vocab)} "
                        f"tokens, {len(merges)} merges; expected 49408 and 48894).",
                        path=DATA_DIR, fix=f"Rebuild them: {REBUILD}")
    return vocab, merges


def _c1_map() -> dict[str, str]:
    # ftfy reads C1 control characters as the Windows-1252 characters they usually were.
    table = {}
    for code in range(0x80, 0xA0):
        try:
            table[chr(code)] = bytes([code]).decode("cp1252")
        except UnicodeDecodeError:  # five bytes are unassigned in cp1252: kept, like ftfy does
            pass
    return table


def _width_map() -> dict[str, str]:
    # ftfy's fix_character_width: half/full-width forms to their NFKC form, ideographic space
    # to a space.
    table = {"\u3000": " "}
    for code in range(0xFF01, 0xFFF0):
        char = chr(code)
        normal = unicodedata.normalize("NFKC", char)
        if normal != char:
            table[char] = normal
    return table


@functools.lru_cache(maxsize=None)
def _reference_cleanup():
    """Normalizers doing (the common part of) the reference's ftfy + html clean-up."""
    from tokenizers import Regex, normalizers

    def replace(table):
        return [normalizers.Replace(old, new) for old, new in table.items()]

    amp = normalizers.Replace("&amp;", "&")
    return [amp, amp, *replace(HTML_ENTITIES), normalizers.Replace(Regex(TERMINAL_ESCAPES), ""),
            *replace(_c1_map()), normalizers.Replace(Regex(CONTROL_CHARS), ""),
            *replace(LIGATURES), *replace(_width_map()),
            normalizers.Replace(Regex(SINGLE_QUOTES), "'"),
            normalizers.Replace(Regex(DOUBLE_QUOTES), '"'),
            normalizers.Replace(Regex(FINAL_SIGMA), "ς")]


def match_reference(tokenizer):
    """Make a transformers `CLIPTokenizer` tokenize like open_clip's reference (see the module
    docstring), e.g. one loaded from a model folder. Returns the same object; idempotent."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    # CLIPTokenizer's own steps (NFC, whitespace to one space, lower case) after the clean-up.
    backend.normalizer = normalizers.Sequence([
        *_reference_cleanup(), normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    # CLIPTokenizer's split, minus its "<|startoftext|>|<|endoftext|>" alternatives: the
    # reference splits those like any other text.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.split_special_tokens = True
    return tokenizer


def _config(kind: str) -> dict:
    path = tokenizer_files(kind)["tokenizer_config.json"]
    config = json.loads(path.read_text(encoding="utf-8"))
    keep = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")
    return {key: config[key] for key in keep}


def _build(kind: str):
    from transformers import CLIPTokenizer

    vocab, merges = _read_data()
    return match_reference(CLIPTokenizer(vocab=vocab, merges=merges, **_config(kind)))


@functools.lru_cache(maxsize=None)
def _shared(kind: str):
    return _build(kind)


def load_clip_tokenizer(kind: str = "sd1", *, fresh: bool = False):
    """The CLIP tokenizer for `kind` ("sd1" or "sd2"), built from the shipped files.

    The default instance is cached and shared: do not change it (add tokens, set attributes).
    `fresh=True` builds a private one (about 30 ms).
    """
    _check_kind(kind)
    return _build(kind) if fresh else _shared(kind)

"""Build the CLIP tokenizer files we ship, from OpenAI's BPE merge list.

Usage:
    pip download --no-deps open-clip-torch -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The argument is either `bpe_simple_vocab_16e6.txt.gz` itself or a wheel/zip that contains it.
The output (default `library/models/clip_tokenizer/`) is what `openai/clip-vit-large-patch14`
ships: `vocab.json` and `merges.txt`, shared by all kinds, plus `sd1/` and `sd2/` folders
holding the `tokenizer_config.json` and `special_tokens_map.json` of each kind. SD 2.x differs
only in its pad token (`!`, id 0 instead of `<|endoftext|>`, id 49407).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from library.errors import UserError, run_cli  # noqa: E402
from library.fileio import write_json_atomic, write_text_atomic  # noqa: E402

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = REPO / "library" / "models" / "clip_tokenizer"
# CLIP keeps the first 49152 - 256 - 2 merges: the vocabulary is 256 bytes, 256 bytes with
# "</w>", one token per merge and the two special tokens, 49408 in all.
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = {"sd1": EOS, "sd2": "!"}


def byte_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for the bytes, in vocab order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    code points from 256 up, so that no token contains whitespace.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


def read_bpe_text(source: Path) -> str:
    if not source.is_file():
        raise UserError(f"{source} does not exist.", path=source,
                        fix="Pass the open-clip-torch wheel or its bpe_simple_vocab_16e6.txt.gz.")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + BPE_NAME) or n == BPE_NAME]
            if not names:
                raise UserError(f"{source} holds no {BPE_NAME}.", path=source,
                                fix="Pass the open-clip-torch wheel (pip download --no-deps "
                                    "open-clip-torch).")
            data = zf.read(names[0])
    else:
        data = source.read_bytes()
    try:
        return gzip.decompress(data).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{source} is not a gzip-compressed BPE merge list ({err}).",
                        path=source, fix=f"Pass {BPE_NAME} or the wheel that contains it.") from err


def build_vocab(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merges as "a b" lines) exactly as CLIP builds them."""
    lines = bpe_text.split("\n")
    # Line 0 is a "#version" header; the merges follow, one "left right" pair a line.
    merges = lines[1:1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise UserError(f"The BPE file has fewer than {NUM_MERGES} well-formed merges.",
                        fix="Use the bpe_simple_vocab_16e6.txt.gz shipped with open-clip-torch.")
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise UserError(f"Built {len(vocab)} distinct tokens instead of 49408.",
                        fix="Use the bpe_simple_vocab_16e6.txt.gz shipped with open-clip-torch.")
    return vocab, merges


def special_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def configs(kind: str) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) as the SD tokenizer folders have them."""
    pad = PAD_TOKENS[kind]
    added = {"49406": {**special_token(BOS, True), "special": True},
             "49407": {**special_token(EOS, False), "special": True}}
    if kind == "sd2":
        # "!" is an ordinary vocab token; SD 2.x registers it as a special (pad) token.
        added["0"] = {**special_token(pad, False), "special": True}
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special_map = {"bos_token": special_token(BOS, True), "eos_token": special_token(EOS, False),
                   "pad_token": special_token(pad, False), "unk_token": special_token(EOS, False)}
    return tokenizer_config, special_map


def write_files(vocab: dict[str, int], merges: list[str], out: Path) -> None:
    # Compact JSON and raw UTF-8 keep the committed files as small as the format allows.
    write_text_atomic(out / "vocab.json",
                      json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    for kind in PAD_TOKENS:
        tokenizer_config, special_map = configs(kind)
        write_json_atomic(out / kind / "tokenizer_config.json", tokenizer_config)
        write_json_atomic(out / kind / "special_tokens_map.json", special_map)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path,
                        help=f"{BPE_NAME}, or the open-clip-torch wheel that contains it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    vocab, merges = build_vocab(read_bpe_text(args.source))
    write_files(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

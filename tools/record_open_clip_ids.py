"""Record reference CLIP token ids from open_clip's own tokenizer, for tests/test_tokenizer.py.

open_clip cannot be a dependency (it pulls torchvision), so this loads only its `tokenizer.py`
straight out of the wheel. That module needs torch and numpy (in our venv) plus ftfy and regex,
which go to a scratch folder outside the venv:

    pip download --no-deps open-clip-torch -d /tmp/oc
    pip install --target /tmp/ocdeps ftfy regex
    python tools/record_open_clip_ids.py /tmp/oc/open_clip_torch-*.whl --deps /tmp/ocdeps

The output maps each prompt to the ids open_clip gives for it (start token, tokens, end token;
truncated to 77 like open_clip does, without its zero padding).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from library.errors import UserError, run_cli  # noqa: E402
from library.fileio import write_text_atomic  # noqa: E402

DEFAULT_OUT = REPO / "tests" / "data" / "clip_token_ids.json"
EOT = 49407

LONG_PROMPT = ", ".join(
    ["masterpiece", "best quality", "ultra detailed", "1girl", "solo", "long hair", "blue eyes",
     "looking at viewer", "smile", "school uniform", "cherry blossoms", "outdoors", "sunlight",
     "depth of field", "bokeh", "soft lighting", "cinematic composition", "highly detailed face",
     "intricate background", "volumetric fog", "golden hour", "wide shot", "artstation",
     "trending on pixiv", "by greg rutkowski and alphonse mucha", "8k wallpaper"])

# Every class of input the tokenizer must agree with open_clip on; the last group (html
# entities, typographic quotes, ligatures, full-width forms, mojibake) is what ftfy/html
# cleaning changes.
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "A Photo Of An ASTRONAUT Riding A Horse",
    "",
    "   ",
    "hello, world! how are you? (fine); [ok] {yes} <no> a/b a\\b a|b",
    "(masterpiece:1.2), [blurry:0.8], ((best quality)), {{detailed}}",
    "long_hair, blue_eyes, looking_at_viewer",
    "it's a dog's life; don't stop, they're here, we've won, I'm in, you'll see, he'd go",
    "IT'S DON'T THEY'RE",
    "rock 'n' roll, 'quoted', \"double quoted\"",
    "1girl, 2boys, 3d render, 4k, 8k uhd, 1024x768, 3.14159, 100%, -5, 1,000,000",
    "year 2023 and 1999, $20, #1, @user, 50/50",
    "tabs\tand\nnewlines\r\nand   many    spaces  ",
    "café, naïve, résumé, über, Ærøskøbing, straße, crème brûlée",
    "cafe\u0301 (combining accent)",
    "東京タワー, 北京, 서울, Москва, Αθήνα, القاهرة, हिन्दी",
    "a cat 🐱 with a hat 🎩 and a rainbow 🌈, 👍🏽, 👨‍👩‍👧",
    "ZALGO: ẗ̸̢h̵͓e̴ ̷c̶a̵t̷",
    "snake_case-and-kebab-case.and.dots...!!!???",
    "email@example.com https://example.com/path?x=1&y=2",
    "<|startoftext|> and <|endoftext|> typed literally",
    "tags<|endoftext|>, more:<|startoftext|>!!",
    LONG_PROMPT,
    LONG_PROMPT + ", " + LONG_PROMPT,
    "word " * 80,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # Input classes that ftfy / html.unescape rewrite before tokenizing:
    "tom &amp; jerry &lt;3 &quot;cartoon&quot; &#39;classic&#39; &nbsp;x",
    "the dog’s ball, “quoted”, ‘single’",
    "ﬁne ﬂower ﬀ",
    "ＦＵＬＬＷＩＤＴＨ １２３ ｔｅｘｔ",
    "ＬＯＵＤ　ＮＯＩＳＥＳ！ and ﾊﾝｶｸ ｶﾀｶﾅ (half-width katakana)",
    "ΟΔΟΣ ΑΘΗΝΑΣ (Greek capitals, final sigma), ΑΣ.Β, Α:Σ, ΈΣ",
    "windows-1252 leftovers: \x93quoted\x94 \x85 \x96 dash",
    "terminal \x1b[36;44mcolours\x1b[0m and \x00control\x07 chars\ufeff",
    "nested &amp;amp; and &amp;lt;3 and &#x27;hex&#x27; &#039;zero&#039;",
    "mojibake: cafÃ© doesnâ€™t",
]


def load_open_clip_tokenizer(wheel: Path, work: Path):
    """Import open_clip/tokenizer.py from the wheel without the package's __init__."""
    if not zipfile.is_zipfile(wheel):
        raise UserError(f"{wheel} is not a wheel.", path=wheel,
                        fix="pip download --no-deps open-clip-torch -d /tmp/oc")
    with zipfile.ZipFile(wheel) as zf:
        # tokenizer.py finds the BPE file next to itself.
        for name in ("open_clip/tokenizer.py", "open_clip/bpe_simple_vocab_16e6.txt.gz",
                     "open_clip/version.py"):
            (work / Path(name).name).write_bytes(zf.read(name))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", work / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    version = {}
    exec((work / "version.py").read_text(), version)
    return module, version["__version__"]


def reference_ids(module, prompt: str) -> list[int]:
    row = module.tokenize([prompt])[0].tolist()
    return row[:row.index(EOT) + 1]


def json_string(text: str) -> str:
    """JSON string with readable Unicode, but invisible characters (controls, BOM, ZWJ) escaped."""
    out = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in out)


def render(header: dict, ids: dict[str, list[int]]) -> str:
    # One prompt a line keeps the file small and its diffs readable.
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    body = ",\n".join(f"    {json_string(p)}: {json.dumps(v)}" for p, v in ids.items())
    return "{\n" + ",\n".join(lines) + ',\n  "ids": {\n' + body + "\n  }\n}\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="open_clip_torch-*.whl")
    parser.add_argument("--deps", type=Path, default=Path("/tmp/ocdeps"),
                        help="folder with ftfy and regex (pip install --target)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    # Appended, not prepended, so the venv's own packages win over the scratch copies.
    sys.path.append(str(args.deps))
    try:
        import ftfy
    except ImportError as err:
        raise UserError("ftfy is not importable.", path=args.deps,
                        fix=f"pip install --target {args.deps} ftfy regex") from err
    with tempfile.TemporaryDirectory() as work:
        module, version = load_open_clip_tokenizer(args.wheel, Path(work))
        ids = {prompt: reference_ids(module, prompt) for prompt in PROMPTS}
    header = {"open_clip_version": version, "ftfy_version": ftfy.__version__,
              "wheel": args.wheel.name, "context_length": 77}
    write_text_atomic(args.out, render(header, ids))
    print(f"wrote {len(ids)} prompts to {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

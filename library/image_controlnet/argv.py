"""Arguments without dashes: `data_dir X epochs 100 batch_size 16` (and `key=value`).

The original ImageControlNet guide's first example is written that way. A bare word that names a flag becomes that flag, so
the example runs as written; a bare word that names no flag is an error that shows the closest
spelling. Values after a real flag (`--data_dir X`) are left alone. Any name of a flag works bare,
also an alias (`val_split 0.2` for --val_fraction). A flag whose value is optional (`fast_dev_run`)
takes the next word only when that word is not an option itself.
"""
from __future__ import annotations

import argparse
import difflib

from library.errors import UserError

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def normalize_bare_pairs(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Returns (argv with bare `key value` pairs turned into `--key value`, the keys converted)."""
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    by_option = {opt: a for a in parser._actions for opt in a.option_strings}
    by_name = {**{opt.lstrip("-"): a for opt, a in by_option.items() if opt.startswith("--")}, **by_dest}

    def is_option(word: str) -> bool:
        return word.startswith("-") or word.partition("=")[0] in by_name

    out, converted = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            out.append(token)
            action = by_option.get(token.split("=", 1)[0])
            if action is not None and _takes_value(action) and "=" not in token and i + 1 < len(argv) \
                    and not (action.nargs == "?" and is_option(argv[i + 1])):
                out.append(argv[i + 1])  # the value of a real flag, whatever it looks like
                i += 1
            i += 1
            continue
        key, eq, inline = token.partition("=")
        action = by_name.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(by_dest), n=1)
            hint = f"--{close[0]}" if close else f"--{key}"
            raise UserError(f"unexpected argument '{token}': '{key}' is not an option of this script.",
                            fix=f"write options with two dashes, e.g. {hint} VALUE "
                                f"(the `key value` form works only with option names; see --help).")
        # the name as written (an alias, or --no-x of a BooleanOptionalAction), else the flag of the dest
        flag = f"--{key}" if f"--{key}" in by_option else next(o for o in action.option_strings if o.startswith("--"))
        converted.append(key)
        if action.nargs == "?" and not eq and (i + 1 == len(argv) or is_option(argv[i + 1])):
            out.append(flag)  # an optional value left out: the flag's const
            i += 1
            continue
        if not _takes_value(action):  # store_true: `use_amp` alone, or `use_amp true|false`
            following = argv[i + 1] if i + 1 < len(argv) else ""
            value = inline if eq else (following if following.lower() in _BOOL_WORDS else None)
            if value is None or _BOOL_WORDS.get(value.lower(), True):
                out.append(flag)
            i += 1 + (value is not None and not eq)
            continue
        if eq:
            out += [flag, inline]
            i += 1
        elif i + 1 < len(argv):
            out += [flag, argv[i + 1]]
            i += 2
        else:
            raise UserError(f"'{key}' at the end of the command has no value.", fix=f"write {flag} VALUE.")
    return out, converted

"""Seed-style arguments without dashes: `data_dir X epochs 100 batch_size 16` (and `key=value`).

The seed's first example is written that way. A bare word that names a flag becomes that flag, so
the example runs as written; a bare word that names no flag is an error that shows the closest
spelling. Values after a real flag (`--data_dir X`) are left alone.
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
    out, converted = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            out.append(token)
            action = by_option.get(token.split("=", 1)[0])
            if action is not None and _takes_value(action) and "=" not in token and i + 1 < len(argv):
                out.append(argv[i + 1])  # the value of a real flag, whatever it looks like
                i += 1
            i += 1
            continue
        key, eq, inline = token.partition("=")
        action = by_dest.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(by_dest), n=1)
            hint = f"--{close[0]}" if close else f"--{key}"
            raise UserError(f"unexpected argument '{token}': '{key}' is not an option of this script.",
                            fix=f"write options with two dashes, e.g. {hint} VALUE "
                                f"(the `key value` form works only with option names; see --help).")
        flag = action.option_strings[-1]
        converted.append(key)
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

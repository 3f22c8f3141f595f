r"""TOML text for --output_config, the GUI presets and autofilled configs: `dumps(table)`.

The `toml` package's writer leaves a backslash before x unescaped and drops control characters'
backslash ("\x1b" comes out as "x1b"), so a value holding `\x`, ESC or DEL is written as TOML that
is rejected or read back changed. This writer escapes every string per TOML 1.0: \\ and \" and the
short escapes, other control characters (and DEL) as \\uXXXX, and everything else as is. What
`dumps` writes, `tomllib.loads` (and `toml.loads`) read back equal.
"""
from __future__ import annotations

import math
import re

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SHORT = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name) -> str:
    name = str(name)
    return name if _BARE_KEY.match(name) else quote(name)


def value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):  # inside an array: an inline table
        return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None) + "}"
    return quote(str(v))  # paths and other objects: their text


def dumps(table: dict, _prefix: str = "") -> str:
    """Plain values first, then one [section] per nested dict; None values are left out (TOML has none)."""
    lines = [f"{key(k)} = {value(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict)]
    for k, sub in table.items():
        if isinstance(sub, dict):
            name = f"{_prefix}{key(k)}"
            body = dumps(sub, name + ".")
            lines += ["", f"[{name}]", body.rstrip("\n")] if body.strip() else ["", f"[{name}]"]
    return "\n".join(lines).lstrip("\n") + "\n"

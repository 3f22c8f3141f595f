"""Field specs read from a script's argparse parser, and the text <-> value rules of its widgets.

Nothing here touches Tk, so the conversions are tested without a display. A widget holds text
(or a bool for flags); `parse_text` turns it into the value the script would get, with the
script's own `type=` range checks and `choices`.
"""
from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass
from typing import Any

# Options that are never a widget: argparse's own help, and the config-file plumbing the GUI
# drives itself (it writes the preset and passes --config_file).
ALWAYS_HIDDEN = {"help", "config_file", "output_config"}


@dataclass
class FieldSpec:
    dest: str
    flag: str                  # "--network_dim", or the dest for a positional
    kind: str                  # "bool" | "choice" | "list" | "text"
    default: Any
    choices: list | None
    help: str
    type: Any                  # argparse type= callable or None
    required: bool
    positional: bool
    group: str                 # argparse group title: the default section
    const: Any = None          # value of a checked flag (store_true -> True)

    def label(self) -> str:
        return self.dest


def is_hidden(action: argparse.Action) -> bool:
    return action.dest in ALWAYS_HIDDEN or action.help == argparse.SUPPRESS


def _group_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            out.setdefault(action.dest, group.title or "options")
    return out


def spec_from_action(action: argparse.Action, group: str) -> FieldSpec:
    flags = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
    positional = not action.option_strings
    flag = flags[0] if flags else action.dest
    if isinstance(action, argparse.BooleanOptionalAction):
        kind = "tristate"      # --x / --no-x / not given (the default, often None = automatic)
    elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        kind = "bool"
    elif action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 1 \
            or isinstance(action, argparse._AppendAction):
        kind = "list"
    elif action.choices is not None:
        kind = "choice"
    else:
        kind = "text"
    return FieldSpec(dest=action.dest, flag=flag, kind=kind, default=action.default,
                     choices=list(action.choices) if action.choices is not None else None,
                     help=action.help or "", type=action.type,
                     required=bool(getattr(action, "required", False)) or positional and action.nargs not in ("?", "*"),
                     positional=positional, group=group, const=getattr(action, "const", None))


def specs_from_parser(parser: argparse.ArgumentParser) -> list[FieldSpec]:
    """Every option of the parser that gets a widget, in parser order."""
    groups = _group_of(parser)
    return [spec_from_action(a, groups.get(a.dest, "options")) for a in parser._actions if not is_hidden(a)]


def hidden_dests(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if is_hidden(a)]


# --- text <-> value -----------------------------------------------------------------------------

def format_scalar(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (tuple, list)):
        return ",".join(format_scalar(v) for v in value)
    return str(value)


def value_to_text(spec: FieldSpec, value) -> str:
    """What a widget shows for a value (as loaded from a preset or a default)."""
    if value is None:
        return ""
    if spec.kind == "list":
        items = value if isinstance(value, (list, tuple)) else [value]
        return shlex.join(format_scalar(v) for v in items)
    return format_scalar(value)


def _convert(spec: FieldSpec, text: str):
    if spec.type is None:
        value = text
    else:
        try:
            value = spec.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise ValueError(str(err) or f"invalid value {text!r}") from None
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"choose one of: {', '.join(map(str, spec.choices))}")
    return value


def _storable(converted, text: str):
    """The TOML value: the converted number/string, or the text itself when the type returns
    something TOML cannot hold (e.g. resolution's tuple); the script converts it again."""
    if isinstance(converted, (bool, int, float, str)):
        return converted
    return text


def parse_text(spec: FieldSpec, text: str):
    """Widget text -> preset value; blank means 'the default'. Raises ValueError with a reason."""
    if isinstance(spec.default, str) and text.strip() == spec.default.strip():
        return spec.default  # a default with spaces (a ", " separator) survives the strip below
    text = text.strip()
    if spec.kind == "list":
        if not text:
            return spec.default
        try:
            items = shlex.split(text)
        except ValueError as err:
            raise ValueError(f"unbalanced quotes ({err})") from None
        return [_storable(_convert(spec, item), item) for item in items]
    if not text:
        return spec.default
    if spec.kind == "tristate":
        if text.lower() not in ("true", "false"):
            raise ValueError("choose true, false or leave it empty")
        return text.lower() == "true"
    return _storable(_convert(spec, text), text)


def bool_value(spec: FieldSpec, checked: bool):
    return (spec.const if spec.const is not None else True) if checked else spec.default


def is_default(spec: FieldSpec, value) -> bool:
    if value is None or value == spec.default:
        return True
    if spec.default is not None and spec.type is not None and isinstance(value, str):
        # e.g. resolution "512" vs a default given as a tuple: compare the converted values
        try:
            return spec.type(value) == spec.default
        except Exception:
            return False
    return False


# --- command lines ------------------------------------------------------------------------------

def flag_args(spec: FieldSpec, value) -> list[str]:
    """The command-line words for one value."""
    if spec.kind == "bool":
        return [spec.flag] if value == bool_value(spec, True) and value != spec.default else []
    if spec.kind == "tristate":
        return [] if value is None else [spec.flag if value else "--no-" + spec.flag[2:]]
    if spec.kind == "list":
        items = [format_scalar(v) for v in value]
        return items if spec.positional else [spec.flag, *items]
    text = format_scalar(value)
    return [text] if spec.positional else [f"{spec.flag}={text}"]

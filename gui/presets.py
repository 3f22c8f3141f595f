"""Presets: TOML files whose keys are exactly the script's argument names, so
`python <script>.py --config_file preset.toml` runs them unchanged.

Only values that differ from the parser's defaults are written. The GUI's own bookkeeping
(format version, preset name, keys this script does not know) lives in one `[preset]` table at
the end, which `library.args.read_config_file` skips. Unknown keys are reported and kept there,
never dropped; a key that a later version of the script knows is restored from it on load.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from library.args import PRESET_TABLE
from library.fileio import write_text_atomic

VERSION = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_presets"
IGNORED_KEYS = {"config_file", "output_config"}   # plumbing; the scripts skip them too

# version -> function(table) -> table, applied in order to older presets (none needed yet).
MIGRATIONS: dict[int, object] = {}


@dataclass
class Preset:
    values: dict = field(default_factory=dict)     # known argument name -> value
    unknown: dict = field(default_factory=dict)    # keys this script has no option for
    name: str | None = None
    script: str | None = None
    version: int = VERSION
    notes: list[str] = field(default_factory=list)  # what the user should be told after loading


def _toml_line(key: str, value) -> str:
    from library import toml_writer  # escapes \x, ESC and DEL correctly (toml.dumps does not)

    return toml_writer.dumps({key: value}).strip()


def dump(script: str, values: dict, order: list[str] | None = None, unknown: dict | None = None,
         name: str | None = None) -> str:
    """The preset text: a comment header, the values in form order, then the [preset] table."""
    keys = [k for k in (order or []) if k in values] + sorted(k for k in values if k not in (order or []))
    lines = [f"# sd-trainers preset v{VERSION} for {script}.py. Run it with:",
             f"#   python {script}.py --config_file <this file>", ""]
    lines += [_toml_line(k, values[k]) for k in keys]
    lines += ["", f"[{PRESET_TABLE}]", _toml_line("version", VERSION), _toml_line("script", script)]
    if name:
        lines.append(_toml_line("name", name))
    if unknown:
        lines += ["", f"# keys {script}.py does not know; kept so nothing is lost",
                  f"[{PRESET_TABLE}.unknown]"]
        lines += [_toml_line(k, unknown[k]) for k in sorted(unknown)]
    return "\n".join(lines) + "\n"


def save(path, script: str, values: dict, order=None, unknown=None, name=None) -> Path:
    path = Path(path)
    write_text_atomic(path, dump(script, values, order, unknown, name))
    return path


def _flatten(table: dict, out: dict) -> dict:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, out)
        else:
            out[key] = value
    return out


def parse(text: str, known: set[str], script: str | None = None, source: str = "preset") -> Preset:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source} is not valid TOML: {err}") from None
    meta = table.pop(PRESET_TABLE, None)
    meta = meta if isinstance(meta, dict) else {}
    preset = Preset(name=meta.get("name"), script=meta.get("script"), version=int(meta.get("version", VERSION)))
    for version in sorted(v for v in MIGRATIONS if preset.version <= v < VERSION):
        table = MIGRATIONS[version](table)
    if preset.version > VERSION:
        preset.notes.append(f"{source} was written by a newer GUI (preset v{preset.version}); "
                            "values are loaded as they are.")
    if script and preset.script and preset.script != script:
        preset.notes.append(f"{source} was made for {preset.script}.py, not {script}.py.")
    flat = _flatten(table, {})
    kept = meta.get("unknown") if isinstance(meta.get("unknown"), dict) else {}
    restored = [k for k in kept if k in known and k not in flat]
    for key in restored:
        flat[key] = kept[key]
    for key, value in flat.items():
        if key in IGNORED_KEYS:
            continue
        if key in known:
            preset.values[key] = value
        else:
            preset.unknown[key] = value
    for key, value in kept.items():
        if key not in known:
            preset.unknown.setdefault(key, value)
    if restored:
        preset.notes.append(f"restored {', '.join(sorted(restored))}: {script}.py knows these options now.")
    new_unknown = sorted(k for k in preset.unknown if k not in kept)
    if new_unknown:
        preset.notes.append(f"{source} has keys that are not options of {script}.py: "
                            f"{', '.join(new_unknown)}. They are kept in the [preset.unknown] table "
                            "when you save, and not passed to the script.")
    return preset


def load(path, known: set[str], script: str | None = None) -> Preset:
    path = Path(path)
    return parse(path.read_text(encoding="utf-8"), known, script, source=str(path))


# --- where presets live -------------------------------------------------------------------------

def gui_home() -> Path:
    """The GUI's own folder: user presets, last session, run files, queue."""
    if os.environ.get("SDT_GUI_HOME"):
        return Path(os.environ["SDT_GUI_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "sd-trainers-gui"


def user_dir(script: str) -> Path:
    return gui_home() / "presets" / script


def safe_filename(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in " ._-" else "_" for c in name).strip(" .")
    return keep or "preset"


@dataclass
class PresetFile:
    label: str
    path: Path
    builtin: bool


def preset_name(path: Path) -> str:
    try:
        meta = tomllib.loads(path.read_text(encoding="utf-8")).get(PRESET_TABLE, {})
        return str(meta.get("name") or path.stem)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return path.stem


def list_presets(script: str) -> list[PresetFile]:
    """Built-in presets first, then the user's, each sorted by name."""
    out = []
    for folder, builtin in ((BUILTIN_DIR / script, True), (user_dir(script), False)):
        if folder.is_dir():
            found = [PresetFile(preset_name(p), p, builtin) for p in folder.glob("*.toml")]
            out += sorted(found, key=lambda f: f.label.lower())
    return out


# --- last session -------------------------------------------------------------------------------

def session_path() -> Path:
    return gui_home() / "session.json"


def last_form_path(script: str) -> Path:
    return gui_home() / "last" / f"{script}.toml"


def read_session() -> dict:
    try:
        data = json.loads(session_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_session(data: dict) -> None:
    write_text_atomic(session_path(), json.dumps(data, indent=2, ensure_ascii=False))

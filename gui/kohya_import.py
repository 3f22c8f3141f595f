"""Import a kohya_ss GUI preset (its LoRA tab's JSON) as one of our presets: File > Import kohya_ss
preset… in the window, `python tools/kohya_ss_preset.py` on the command line. The translation is
library.kohya_ss; this module writes the preset (and the sample prompts kohya_ss keeps inline)."""
from __future__ import annotations

import json
from pathlib import Path

from gui import presets, registry
from library.errors import UserError
from library.kohya_ss import to_flags, translate


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable kohya_ss preset ({err}).", path=path,
                        fix="pick a .json file that kohya_ss saved (its LoRA tab: Configuration > Save).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a kohya_ss preset (a JSON object of settings).", path=path,
                        fix="pick a .json file that kohya_ss saved.")
    return data


def script_parser(script: str):
    entry = next((e for e in registry.SCRIPTS if e.module == script), None)
    loaded = registry.load_script(entry) if entry is not None else None
    if loaded is None or not loaded.ok:
        raise UserError(f"the preset is for {script}.py, which this toolkit does not have (yet).",
                        fix="import a preset for SD1.x/SD2.x LoRA training (kohya_ss: sdxl unchecked).")
    return loaded.parser


def convert(json_path: Path, out_path: Path | None = None, parser=None) -> tuple[Path, str, list[str]]:
    """Write our preset for a kohya_ss JSON; returns (preset path, script, notes for the user).

    Default place: the GUI's preset folder of the script, named after the JSON file.
    """
    json_path = Path(json_path)
    result = translate(read_json(json_path))
    parser = parser or script_parser(result.script)
    values, notes = to_flags(result, parser)
    name = json_path.stem
    out_path = Path(out_path) if out_path else presets.user_dir(result.script) / f"{presets.safe_filename(name)}.toml"
    if result.sample_prompts_text is not None:
        prompts = out_path.with_name(out_path.stem + "_prompts.txt")
        from library.fileio import write_text_atomic

        write_text_atomic(prompts, result.sample_prompts_text.rstrip("\n") + "\n")
        values["sample_prompts"] = str(prompts)
        notes.append(f"the sample prompts were written to {prompts}")
    order = [a.dest for a in parser._actions]
    presets.save(out_path, result.script, values, order=order, name=name)
    return out_path, result.script, notes

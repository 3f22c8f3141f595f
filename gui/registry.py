"""Which scripts the GUI knows: one line per script. A script appears only when its file exists.

Adding a script to the GUI is one line here; its form comes from its own `setup_parser()`.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScriptEntry:
    tab: str            # label shown in the notebook
    module: str         # importable module name (relative to the repo root)
    kind: str           # "train": a tab of its own; "tool": a page of the Tools tab

    @property
    def path(self) -> Path:
        return REPO / (self.module.replace(".", "/") + ".py")

    @property
    def stem(self) -> str:
        """Short name used for preset folders and run files."""
        return self.module.rsplit(".", 1)[-1]


SCRIPTS: list[ScriptEntry] = [
    ScriptEntry("LoRA", "train_network", "train"),
    ScriptEntry("ControlNet", "train_controlnet", "train"),
    ScriptEntry("Dual UNet", "train_dual_unet", "train"),
    ScriptEntry("Image ControlNet", "train_image_controlnet", "train"),
    ScriptEntry("Merge LoRA", "networks.merge_lora", "tool"),
    ScriptEntry("SVD merge", "networks.svd_merge_lora", "tool"),
    ScriptEntry("Resize LoRA", "networks.resize_lora", "tool"),
    ScriptEntry("Extract LoRA", "networks.extract_lora_from_models", "tool"),
    ScriptEntry("Check LoRA", "networks.check_lora_weights", "tool"),
    ScriptEntry("Generate images", "gen_img", "tool"),
    ScriptEntry("Tagger", "finetune.tag_images_by_wd14_tagger", "tool"),
    ScriptEntry("Captioner", "finetune.make_captions", "tool"),
    ScriptEntry("Captions→JSON", "finetune.merge_captions_to_metadata", "tool"),
    ScriptEntry("Tags→JSON", "finetune.merge_dd_tags_to_metadata", "tool"),
    ScriptEntry("Clean JSON", "finetune.clean_captions_and_tags", "tool"),
    ScriptEntry("Resize images", "tools.resize_images_to_resolution", "tool"),
]


@dataclass
class LoadedScript:
    entry: ScriptEntry
    parser: object = None           # argparse.ArgumentParser, or None when loading failed
    error: str | None = None        # why the script could not be loaded (shown in its tab)
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.parser is not None


def load_script(entry: ScriptEntry) -> LoadedScript | None:
    """Import the script and build its parser; None when the file does not exist (yet)."""
    if not entry.path.is_file():
        return None
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        module = importlib.import_module(entry.module)
        parser = module.setup_parser()
    except Exception as err:  # a half-written script must not take the GUI down
        detail = traceback.format_exception_only(type(err), err)[-1].strip()
        return LoadedScript(entry, None, f"{entry.path.name} could not be loaded: {detail}")
    return LoadedScript(entry, parser)


def available(entries=None) -> list[LoadedScript]:
    """The scripts that exist, in registry order (failed imports included, with their error)."""
    out = []
    for entry in entries or SCRIPTS:
        loaded = load_script(entry)
        if loaded is not None:
            out.append(loaded)
    return out


def present(entries=None) -> list[ScriptEntry]:
    """The scripts whose file exists (nothing imported yet)."""
    return [e for e in entries or SCRIPTS if e.path.is_file()]


def missing(entries=None) -> list[ScriptEntry]:
    return [e for e in entries or SCRIPTS if not e.path.is_file()]

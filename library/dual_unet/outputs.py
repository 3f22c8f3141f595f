"""What a paired run writes, and where (the original CF/FA scripts' layout):

    <output_dir>/<name>/                       the run folder (--name; without it <output_dir> itself)
      training_log.txt                         one tab-separated line per logged step
      validation_log.txt                       one line per validation (fixed noise and timesteps)
      logs/                                    TensorBoard
      step_000500_random_pairs/                pair_0000.png (a | b) ... and grid.png
      best_checkpoint/                         the checkpoint with the lowest validation loss so far
      latest_checkpoints/step_000500/ ...      the --keep_last newest checkpoints (rolling)
      top_k_checkpoints/step_000400/ ...       --save_top_k: the k best by --monitor, listed (best
                                               first) in dual_unet-top_k.json
      dual_unet-interrupted-state/             only after Ctrl+C: resume from here

A checkpoint folder holds <a>.safetensors and <b>.safetensors (kohya LoRA files that WebUI,
ComfyUI and diffusers load for one UNet each), dual_unet.json (base model, modalities, prompts,
settings: what gen_pairs.py needs) and state/ (both LoRAs, optimizer, scheduler, RNGs, data
position: what --resume needs). Each folder is written to a temporary folder and renamed.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from library.errors import UserError
from library.fileio import atomic_dir, write_json_atomic
from library.dual_unet.model import INFO_FILE, STATE_DIR

LATEST, BEST, TOP_K = "latest_checkpoints", "best_checkpoint", "top_k_checkpoints"
INTERRUPTED = "dual_unet-interrupted-state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunFolder:
    def __init__(self, output_dir, name: str | None, create: bool = True):
        self.root = Path(output_dir) / name if name else Path(output_dir)
        if create:  # only the main process of a multi-process run creates and writes files
            self.root.mkdir(parents=True, exist_ok=True)
        self.training_log = self.root / "training_log.txt"
        self.validation_log = self.root / "validation_log.txt"
        self.logs, self.latest, self.best = self.root / "logs", self.root / LATEST, self.root / BEST

    def samples(self, step: int) -> Path:
        return self.root / f"step_{step:06d}_random_pairs"

    def checkpoint(self, step: int) -> Path:
        return self.latest / f"step_{step:06d}"

    def top_checkpoint(self, step: int) -> Path:
        return self.root / TOP_K / f"step_{step:06d}"

    def latest_steps(self) -> list[tuple[int, Path]]:
        if not self.latest.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.latest.iterdir() if (m := _STEP_DIR.match(p.name)))


class TextLog:
    """Tab-separated lines under a header; a resumed run appends to the same file after a marker."""

    def __init__(self, path: Path, columns: list[str], resumed_from: int | None = None):
        self.path, self.columns = Path(path), columns
        if not self.path.is_file() or resumed_from is None:
            self.path.write_text("\t".join(columns) + "\n", encoding="utf-8")
        else:
            self._append(f"# resumed from step {resumed_from} at {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def _append(self, line: str) -> None:
        # A line at a time, flushed: the file is readable while training runs (tail -f).
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def write(self, values: dict) -> None:
        cells = []
        for col in self.columns:
            value = values.get(col, "")
            cells.append(f"{value:.6g}" if isinstance(value, float) else str(value))
        self._append("\t".join(cells))


def read_log(path) -> list[dict]:
    """The rows of a training/validation log as dicts of floats (for tests and tools)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    head = lines[0].split("\t")
    return [{k: float(v) for k, v in zip(head, ln.split("\t")) if v != ""} for ln in lines[1:]]


class CheckpointWriter:
    """Writes checkpoint folders; `save_state(path)` writes the training state (the loop's format)."""

    def __init__(self, run: RunFolder, dual, info: dict, metadata: list[dict], save_dtype, ext: str,
                 keep_last: int, save_state, say=print):
        self.run, self.dual, self.info, self.metadata = run, dual, info, metadata
        self.save_dtype, self.ext, self.keep_last, self.save_state, self.say = save_dtype, ext, keep_last, save_state, say
        self.files = [f"{m}.{ext}" for m in dual.modalities]

    def write(self, folder: Path, epoch: int, step: int, extra: dict | None = None) -> Path:
        from library.training import metadata as meta_mod

        with atomic_dir(folder) as tmp:
            for network, unet, name, meta in zip(self.dual.networks, self.dual.unets, self.files, self.metadata):
                network.save_weights(str(tmp / name), self.save_dtype,
                                     meta_mod.for_save(meta, epoch, step) if self.ext == "safetensors" else None)
                if self.ext == "safetensors":  # the kohya file contract, checked on every file (as train_network)
                    from library.lora_tools.verify import check_saved_lora

                    check_saved_lora(tmp / name, unet)
            write_json_atomic(tmp / INFO_FILE, {**self.info, "files": self.files, "epoch": epoch, "step": step,
                                                **(extra or {})})
            self.save_state(tmp / STATE_DIR)
        return folder

    def save_latest(self, epoch: int, step: int, extra: dict | None = None) -> Path:
        folder = self.write(self.run.checkpoint(step), epoch, step, extra)
        for _, old in self.run.latest_steps()[:-self.keep_last]:
            import shutil

            shutil.rmtree(old)
        self.say(f"saved checkpoint {folder}")
        return folder

    def save_best(self, epoch: int, step: int, extra: dict) -> Path:
        folder = self.write(self.run.best, epoch, step, extra)
        self.say(f"new best validation loss {extra.get('val_loss', float('nan')):.5f} at step {step}: {folder}")
        return folder


def resolve_resume(resume: str | None, run: RunFolder) -> str | None:
    """--resume: a state folder, a checkpoint folder (its state/), or 'latest' (the newest of the
    rolling checkpoints and an interrupted state in this run folder)."""
    if not resume:
        return None
    if resume in ("latest", "auto"):
        from library.training.checkpoint import usable_states

        candidates = [p / STATE_DIR for _, p in run.latest_steps()] + [run.root / INTERRUPTED]
        found = [(step, str(p)) for step, p in usable_states(candidates)]  # damaged ones skipped
        if not found:
            raise UserError(f"--resume {resume}: {run.root} has no checkpoint with a training state yet.",
                            path=run.root, fix="check --output_dir and --name, or start without --resume.")
        return max(found)[1]
    path = Path(resume)
    if (path / STATE_DIR / "train_state.json").is_file():
        return str(path / STATE_DIR)
    if (path / "train_state.json").is_file():
        return str(path)
    raise UserError("the --resume folder is neither a checkpoint nor a training state.", path=path,
                    fix=f"pass a checkpoint folder (e.g. {run.latest}/step_001000), its state/ folder, or 'latest'.")

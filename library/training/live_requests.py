""""Sample now" and "save now" for a running training: a request is an empty file in the run's
output folder, which the training loop takes (deletes) and honours at the next optimizer step.

    touch out/.sample-now      # the GUI's "Sample now" does this; a shell works as well
    touch out/.save-now        # a numbered save (and state folder with --save_state) at the next step

The main process looks for the files (two stats per step); with several processes the answer is
shared, so every process takes part in the save.
"""
from __future__ import annotations

import os
from pathlib import Path

SAMPLE, SAVE = "sample", "save"
FILES = {SAMPLE: ".sample-now", SAVE: ".save-now"}


def request(output_dir, what: str) -> Path:
    """Ask the run writing to `output_dir` to sample or save at its next step."""
    path = Path(output_dir) / FILES[what]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def pending(output_dir) -> list[str]:
    """The requests waiting in `output_dir` (not taken)."""
    return [what for what, name in FILES.items() if (Path(output_dir) / name).exists()]


def take(output_dir) -> set[str]:
    """The requests waiting in `output_dir`, removed so each is honoured once."""
    taken = set()
    for what, name in FILES.items():
        try:
            os.unlink(Path(output_dir) / name)
        except FileNotFoundError:
            continue
        except OSError:
            pass       # e.g. a read-only folder: honour it anyway, it cannot repeat forever unseen
        taken.add(what)
    return taken


def take_everywhere(accelerator, output_dir, check: bool) -> set[str]:
    """take() on the main process (when `check`), the same answer on every process."""
    asked = take(output_dir) if check and accelerator.is_main_process else set()
    if accelerator.num_processes <= 1:
        return asked
    import torch
    import torch.distributed as dist

    flags = torch.tensor([float(w in asked) for w in (SAMPLE, SAVE)], device=accelerator.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return {w for w, f in zip((SAMPLE, SAVE), flags.tolist()) if f}

"""Training state for --save_state / --resume, output file names, and keep-last-N pruning.

A state folder holds everything an interrupted run needs to continue as if never stopped:
the trainable weights, optimizer and scheduler states, every RNG (python, numpy, torch, CUDA and
the noise generator) and the data position (epoch and next batch). It is written to a temporary
folder and renamed, and loaded with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.fileio import atomic_dir, check_finite, nonfinite_tensors, tensor_bytes

STATE_VERSION = 1


@dataclass
class TrainState:
    global_step: int = 0      # optimizer steps done
    epoch: int = 0            # current epoch (0-based)
    next_batch: int = 0       # index of the next batch of `epoch` to train on
    seed: int = 0
    max_train_steps: int = 0
    extra: dict = field(default_factory=dict)


def model_file_name(output_name: str, ext: str, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: last.safetensors, last-000005.safetensors, last-step00000100.safetensors."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name}-step{step:08d}.{ext}"
    return f"{output_name}.{ext}"


def top_k_file_name(output_name: str, ext: str, step: int) -> str:
    """--save_top_k files: last-top-step00000100.safetensors (no clash with the numbered saves)."""
    return model_file_name(f"{output_name}-top", ext, step=step)


class TopKCheckpoints:
    """--save_top_k: the k model files with the best values of the monitored metric so far.

    `entries` (best first) is plain data, kept in the state folders' `extra`, so a resumed run
    goes on with the same list. A new value must be strictly better than the worst kept one to
    replace it once k files exist; NaN never counts.
    """

    def __init__(self, k: int, monitor: str, mode: str = "min", entries: list | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, not {mode!r}")
        self.k, self.monitor, self.mode = int(k), monitor, mode
        self.entries: list[dict] = list(entries or [])

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def wants(self, value: float, step: int) -> bool:
        value = float(value)
        if value != value or any(e["step"] == step for e in self.entries):
            return False
        return len(self.entries) < self.k or self._better(value, self.entries[-1]["value"])

    def add(self, value: float, epoch: int, step: int, path: Path) -> list[Path]:
        """Record a saved file; returns the files that dropped out of the best k (to delete)."""
        entry = {"value": float(value), "epoch": int(epoch), "step": int(step), "file": Path(path).name}
        at = next((i for i, e in enumerate(self.entries) if self._better(entry["value"], e["value"])),
                  len(self.entries))
        self.entries.insert(at, entry)
        dropped, self.entries = self.entries[self.k:], self.entries[:self.k]
        return [Path(path).parent / e["file"] for e in dropped]

    def index(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, "k": self.k, "best_first": self.entries}


class TopKSaver:
    """--save_top_k for any trainer: `offer(metrics, epoch, step)` writes a checkpoint through
    `save(epoch, step) -> Path` (a file or a folder) when the monitored value is among the k best so
    far, deletes what dropped out of the best k and rewrites `index_path` (best first). The trainer
    decides the format; the ranking, deleting and listing are the same everywhere."""

    def __init__(self, k: int, monitor: str, mode: str, save, index_path: Path, entries: list | None = None):
        self.top = TopKCheckpoints(k, monitor, mode, entries)
        self.save, self.index_path = save, Path(index_path)
        self.seen: set[str] = set()  # every metric name offered, for the warning below

    @property
    def entries(self) -> list[dict]:
        return self.top.entries

    def offer(self, metrics: dict, epoch: int, step: int) -> Path | None:
        """Returns the checkpoint written, or None when the value is not among the best k."""
        self.seen.update(metrics)
        monitor = self.top.monitor
        if monitor not in metrics or not self.top.wants(metrics[monitor], step):
            return None
        path = self.save(epoch, step)
        for old in self.top.add(metrics[monitor], epoch, step, path):
            if old.is_dir():
                import shutil

                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        from library.fileio import write_json_atomic

        write_json_atomic(self.index_path, self.top.index())
        return Path(path)

    def warn_if_never_offered(self) -> None:
        """A --monitor name that never came (a typo) would otherwise silently save nothing."""
        if self.top.monitor in self.seen:
            return
        from library.logs import warn_once

        warn_once(f"--save_top_k: the monitored metric {self.top.monitor} was never logged, so no top-k files were "
                  f"saved (logged: {', '.join(sorted(self.seen)) or 'nothing'}); choose one of these with --monitor.")


def state_dir_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    return Path(model_file_name(output_name, "x", epoch, step)).stem + "-state"


def prune_old(output_dir: Path, output_name: str, kind: str, keep: int, suffix: str,
              only: set[str] | None = None) -> list[Path]:
    """Delete all but the `keep` newest epoch- or step-numbered outputs; returns what was removed.
    `only`: the names this run wrote; files of earlier runs in the same folder are never touched."""
    number = r"(\d{6})" if kind == "epoch" else r"step(\d{8})"
    pattern = re.compile(re.escape(output_name) + "-" + number + re.escape(suffix) + "$")
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                   if (m := pattern.match(p.name)) and (only is None or p.name in only))
    removed = []
    for _, path in found[:-keep] if keep else []:
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def _rng_states(noise_generator: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    states = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        states["noise"] = noise_generator.get_state()
    return states


def _set_rng_states(states: dict, noise_generator: torch.Generator | None) -> None:
    py = states["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((states["python_version"], tuple(int(v) for v in py[:-1]), gauss))
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"],
                         states["numpy_gauss"][0], states["numpy_gauss"][1]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if noise_generator is not None and "noise" in states:
        noise_generator.set_state(states["noise"])


def save_train_state(path: Path, state: TrainState, trainable: torch.nn.Module, optimizer, lr_scheduler,
                     noise_generator: torch.Generator | None = None, scaler=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    weights = {k: v.detach().contiguous().cpu() for k, v in trainable.state_dict().items()}
    check_finite(weights, path / "trainable.safetensors", "trainable")
    # weights + the optimizer's moments (about 2x for Adam): what the folder needs on disk
    needed = tensor_bytes(weights) + tensor_bytes(optimizer.state_dict().get("state", {}))
    with atomic_dir(path, needed_bytes=needed) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_states(noise_generator), tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "train_state.json").write_text(json.dumps({"version": STATE_VERSION, **asdict(state)}, indent=2))
    return path


_STATE_TYPES = {"global_step": int, "epoch": int, "next_batch": int, "seed": int, "max_train_steps": int,
                "extra": dict}


def read_train_state(path: Path) -> TrainState:
    """The state folder's train_state.json, checked: malformed JSON, a missing or mistyped field is a
    UserError naming the file; unknown keys (a newer version's, or hand-edited) are ignored with a note."""
    path = Path(path)
    info_file = path / "train_state.json"
    if not info_file.is_file():
        raise UserError(f"{path} is not a training state folder (no train_state.json in it).", path=path,
                        fix="pass --resume a folder ending in '-state' that --save_state wrote.")
    damaged = "resume from another state folder (an older one, or the run's -state folder)."
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"the training state file {info_file} is damaged ({err}).", path=info_file,
                        fix=damaged) from None
    if not isinstance(info, dict):
        raise UserError(f"the training state file {info_file} holds no table of values.", path=info_file, fix=damaged)
    if info.pop("version", None) != STATE_VERSION:
        raise UserError("the state folder was written by an incompatible version.", path=path,
                        fix="start a new run, or resume with the version that wrote it.")
    unknown = sorted(set(info) - set(_STATE_TYPES))
    if unknown:
        from library.logs import warn_once

        warn_once(f"{info_file}: ignoring unknown keys {', '.join(unknown)}.")
    problems = [f"{key} is missing" for key in _STATE_TYPES if key not in info and key != "extra"]
    problems += [f"{key} is {info[key]!r}, not a {kind.__name__}" for key, kind in _STATE_TYPES.items()
                 if key in info and (not isinstance(info[key], kind) or isinstance(info[key], bool)
                                     or (kind is int and info[key] < 0))]
    if problems:
        raise UserError(f"the training state file {info_file} is damaged: {'; '.join(problems)}.", path=info_file,
                        fix=damaged)
    return TrainState(**{k: info[k] for k in _STATE_TYPES if k in info})


def usable_state(path: Path) -> bool:
    """True when `path` holds a readable, complete state (for --resume latest: skip damaged ones)."""
    from library.fileio import check_complete

    try:
        read_train_state(path)
        for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
            check_complete(Path(path) / name)
    except (UserError, OSError, ValueError):
        return False
    return True


def usable_states(folders) -> list[tuple[int, Path]]:
    """(global step, folder) of the readable, complete state folders among `folders`, oldest first:
    what --resume latest chooses from. Damaged ones (malformed train_state.json, a missing or
    truncated file, e.g. from a kill during the save) are skipped with a note naming them."""
    found, skipped = [], []
    for folder in folders:
        folder = Path(folder)
        if not (folder / "train_state.json").is_file():
            continue
        if usable_state(folder):
            found.append((read_train_state(folder).global_step, folder))
        else:
            skipped.append(folder)
    if skipped:
        from library.logs import warn_once

        warn_once(f"--resume latest: skipping {len(skipped)} damaged state folder(s): "
                  f"{', '.join(str(p) for p in skipped[:3])}.")
    return sorted(found)


def load_train_state(path: Path, trainable: torch.nn.Module, optimizer, lr_scheduler,
                     noise_generator: torch.Generator | None = None, scaler=None) -> TrainState:
    from safetensors.torch import load_file

    path = Path(path)
    state = read_train_state(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        bad = nonfinite_tensors(weights)
        if bad:
            raise UserError(f"the state in {path} holds NaN or Inf weights ({len(bad)} tensors, e.g. {bad[0]}): it "
                            "was saved after the training diverged.", path=path,
                            fix="resume from an older state folder, saved before the divergence, with a lower "
                                "--learning_rate.")
        missing, unexpected = trainable.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UserError(f"the state in {path} does not match this network "
                            f"({len(missing)} missing, {len(unexpected)} unexpected weights).", path=path,
                            fix="resume with the same --network_dim, --network_args and model as the saved run.")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_states(torch.load(path / "rng.pt", weights_only=True), noise_generator)
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot read the training state in {path} ({err}).", path=path,
                        fix="the folder is damaged or incomplete; resume from an older state folder.") from None
    return state

"""Checks before a run, collected into one list: values the parser rejects, missing required
options, input paths that do not exist, output folders that cannot be written, and the dataset
preflight (the trainers' own dataset builder: folder layout, images, captions, buckets).

No Tk here; the GUI runs `check` in a worker thread (the dataset check reads every image).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gui import layout, presets
from gui.specs import flag_args

INPUT_KINDS = {"file", "dir", "file_or_dir", "files"}
DATASET_KEYS = ("train_data_dir", "reg_data_dir", "dataset_config")


@dataclass
class Problem:
    dest: str | None      # the field to mark, or None for a problem of the whole run
    message: str


@dataclass
class DatasetReport:
    summary: str
    steps_per_epoch: int
    folders: list[dict]                 # {dir, images, repeats, reg, captions}
    buckets: list[tuple[int, int, int]]  # (width, height, images x repeats)
    notes: str = ""
    plan: str = ""


@dataclass
class Result:
    problems: list[Problem] = field(default_factory=list)
    dataset: DatasetReport | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _resolve(path: str, cwd: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(cwd) / p


def _writable_target(path: Path) -> str | None:
    """None if `path` (a folder or file to be written) can be created/written, else why not."""
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def check_paths(path_kinds: dict, values: dict, cwd: str) -> list[Problem]:
    problems = []
    for dest, value in values.items():
        kind = path_kinds.get(dest)
        if not kind or value in (None, "", []):
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            p = _resolve(str(item), cwd)
            if kind in INPUT_KINDS:
                ok = p.is_file() if kind in ("file", "files") else p.is_dir() if kind == "dir" else p.exists()
                if not ok:
                    what = {"dir": "folder", "file_or_dir": "file or folder"}.get(kind, "file")
                    problems.append(Problem(dest, f"{what} not found: {p}"))
            elif kind == "save_dir" and p.exists() and not p.is_dir():
                problems.append(Problem(dest, f"{p} is a file, not a folder"))
            else:
                why = _writable_target(p)
                if why:
                    problems.append(Problem(dest, why))
    return problems


def check_required(required: list, values: dict) -> list[Problem]:
    problems = []
    for item in required:
        names = item if isinstance(item, tuple) else (item,)
        if not any(values.get(n) not in (None, "", []) for n in names):
            if len(names) == 1:
                problems.append(Problem(names[0], "required"))
            else:
                for n in names:
                    problems.append(Problem(n, f"set one of: {', '.join(names)}"))
    return problems


def cli_args(specs, values: dict) -> list[str]:
    """Options that also go on the command line: positionals and argparse-required ones
    (argparse checks them before the config file is read), and --x/--no-x switches (the
    config-file reader wraps their value in a list, which makes `false` true)."""
    out = []
    for spec in specs:
        if (spec.positional or spec.required or spec.kind == "tristate") and spec.dest in values:
            out += flag_args(spec, values[spec.dest])
    return out


def parse_like_script(parser, script: str, specs, values: dict, cwd: str):
    """Write the preset and parse it exactly as the script will (`--config_file`). Returns
    (args namespace or None, problem or None)."""
    from library import args as A
    from library.errors import UserError

    fd, tmp = tempfile.mkstemp(suffix=".toml", prefix="sdt-check-")
    os.close(fd)
    err = io.StringIO()
    try:
        presets.save(tmp, script, values)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), _chdir(cwd):
            return A.parse_args(parser, ["--config_file", tmp, *cli_args(specs, values)]), None
    except UserError as e:
        return None, Problem(None, str(e))
    except SystemExit:
        text = err.getvalue().strip().splitlines()
        return None, Problem(None, text[-1] if text else "the script rejected the arguments")
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def _chdir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _split_listing(text: str) -> list[str]:
    """The dataset builder lists problems as '(1) ... (2) ...': one entry each."""
    items = [p.strip() for p in re.split(r"\s*\(\d+\)\s+", text)[1:] if p.strip()]
    return items or [text]


def options_named(message: str, options: set[str], fallback: str) -> list[str]:
    """The options a message is about (`--min_bucket_reso`, `bucket_reso_steps`), so the mark
    lands on the field to fix; `fallback` when it names none."""
    named = [d for d in sorted(options) if re.search(rf"(?<![\w-])--{d}\b", message)
             or "_" in d and re.search(rf"(?<![\w-]){d}\b", message)]
    return named or [fallback]


def dataset_report(args, cwd: str) -> tuple[DatasetReport | None, list[Problem]]:
    """The trainers' own dataset builder, without a model: every dataset problem at once."""
    from library.data import build_dataset_group, dataset_configs_from_args
    from library.errors import UserError

    out = io.StringIO()
    dest = "dataset_config" if getattr(args, "dataset_config", None) else "train_data_dir"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), _chdir(cwd):
            configs = dataset_configs_from_args(args)
            group = build_dataset_group(configs, getattr(args, "seed", None),
                                        bool(getattr(args, "skip_bad_images", False)), workers=1)
    except UserError as err:
        options = set() if dest == "dataset_config" else set(vars(args))   # a TOML's problem is the file's
        return None, [Problem(d, m) for m in _split_listing(str(err)) for d in options_named(m, options, dest)]
    folders = []
    for d, config in enumerate(group.datasets):
        for s, sub in enumerate(config.subsets):
            recs = [r for r in group.images if r.dataset == d and r.subset == s]
            captioned = sum(1 for r in recs if r.caption_source not in ("class token", "none"))
            folders.append({"dir": sub.image_dir, "images": len(recs), "repeats": sub.num_repeats,
                            "reg": sub.is_reg, "captions": captioned})
    buckets: dict[tuple[int, int], int] = {}
    for d in range(len(group.datasets)):
        for (w, h), items in group.buckets[d].items():
            buckets[(w, h)] = buckets.get((w, h), 0) + len(items)
    report = DatasetReport(summary=group.summary(), steps_per_epoch=group.num_batches_per_epoch,
                           folders=folders, buckets=[(w, h, n) for (w, h), n in sorted(buckets.items())],
                           notes=out.getvalue().strip())
    report.plan = training_plan(args, report.steps_per_epoch)
    if report.steps_per_epoch == 0:
        return report, [Problem(dest, "the dataset has no training images")]
    return report, []


def training_plan(args, steps_per_epoch: int) -> str:
    """How steps, epochs and batches add up (kohya's rule: epochs override steps)."""
    accum = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    per_epoch = math.ceil(steps_per_epoch / accum) if steps_per_epoch else 0
    if not per_epoch:
        return ""
    epochs = getattr(args, "max_train_epochs", None)
    steps = epochs * per_epoch if epochs else int(getattr(args, "max_train_steps", 0) or 0)
    epochs = epochs or math.ceil(steps / per_epoch)
    return (f"{steps} optimizer steps = {epochs} epoch(s) of {per_epoch} step(s)"
            + (f" ({steps_per_epoch} batches, gradient accumulation {accum})" if accum > 1 else ""))


def check(form_snapshot: dict, cwd: str | None = None, dataset: bool = True) -> Result:
    """All checks for one run. `form_snapshot` comes from ScriptTab.snapshot():
    {parser, script, kind, specs, path_kinds, values, parse_problems, required}."""
    cwd = cwd or os.getcwd()
    snap = form_snapshot
    values = snap["values"]
    result = Result()
    result.problems += [Problem(d, m) for d, m in snap["parse_problems"].items()]
    result.problems += check_required(snap["required"], values)
    result.problems += check_paths(snap["path_kinds"], values, cwd)
    if result.problems:
        return result
    args, problem = parse_like_script(snap["parser"], snap["script"], snap["specs"], values, cwd)
    if problem:
        result.problems.append(problem)
        return result
    if dataset and snap["kind"] == "train" and any(values.get(k) for k in DATASET_KEYS):
        report, problems = dataset_report(args, cwd)
        result.dataset = report
        result.problems += problems
    return result


def problems_by_field(problems: list[Problem]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in problems:
        if p.dest:
            out[p.dest] = out[p.dest] + "; " + p.message if p.dest in out else p.message
    return out


def layout_required(kind: str, dests) -> list:
    return layout.required_for(kind, set(dests))

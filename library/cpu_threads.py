"""A sane number of torch CPU threads when the user chose none.

Without OMP_NUM_THREADS, torch starts one thread per logical CPU it can see, which on a
container with a CPU quota, hyper-threads, or a machine shared with other jobs oversubscribes
the cores (a GUI-started run was measured at 1.3 s per latent against 86 images/s with one
thread). Entry scripts call `apply_default()` (through `library.errors.run_cli`) before any
work: physical cores this process may use, capped by the cgroup CPU quota, and one line saying so.
An OMP_NUM_THREADS set by the user (or by `accelerate launch`) is always kept.
"""
from __future__ import annotations

import math
import os
import sys

_said = False


def physical_cores(cpuinfo: str, allowed: set[int]) -> int:
    """Distinct (socket, core) pairs among the allowed logical CPUs of a /proc/cpuinfo text
    (hyper-threads share a core); len(allowed) when the text does not say."""
    cores, cpu, socket = set(), None, "0"
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu, socket = int(value), "0"
        elif key == "physical id":
            socket = value
        elif key == "core id" and cpu in allowed:
            cores.add((socket, value))
    return len(cores) or len(allowed)


def cgroup_quota(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("max 100000" = no limit, "150000 100000" = 1.5)."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def default_threads() -> tuple[int, str]:
    """(threads, why) for this machine."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = physical_cores(_read("/proc/cpuinfo") or "", allowed)
    quota = cgroup_quota(_read("/sys/fs/cgroup/cpu.max"))
    if quota is not None and quota < cores:
        return max(1, math.floor(quota)), f"the container's CPU quota of {quota:g} CPUs"
    return max(1, cores), f"{cores} physical core(s) of {len(allowed)} logical CPU(s)"


def apply_default(say=print) -> int | None:
    """Set the default when OMP_NUM_THREADS is unset; returns the number chosen (None: the user's)."""
    global _said
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads, why = default_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)   # read by torch at import and by worker processes
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    if not _said:
        _said = True
        say(f"CPU threads: {threads} ({why}); set OMP_NUM_THREADS to choose another number.")
    return threads

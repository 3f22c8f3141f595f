"""Issue 20 bug 7: scripts pick a sane torch thread count when OMP_NUM_THREADS is unset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from library import cpu_threads

REPO = Path(__file__).resolve().parents[1]

# two hyper-threaded cores on one socket: 4 logical CPUs
CPUINFO = "".join(f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n\n" for cpu in range(4))


def test_physical_cores_and_quota():
    assert cpu_threads.physical_cores(CPUINFO, {0, 1, 2, 3}) == 2
    assert cpu_threads.physical_cores(CPUINFO, {0}) == 1                  # affinity limits it
    assert cpu_threads.physical_cores("", {0, 1, 2}) == 3                 # no cpuinfo: logical CPUs
    assert cpu_threads.cgroup_quota("max 100000") is None
    assert cpu_threads.cgroup_quota("150000 100000") == 1.5
    assert cpu_threads.cgroup_quota(None) is None


PROBE = ("from library.errors import run_cli\n"
         "def main(argv):\n"
         "    import torch\n"
         "    print('threads', torch.get_num_threads())\n"
         "run_cli(main, [])\n")


def _probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_script_without_omp_num_threads_says_what_it_picked():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    text = _probe(env)
    expected, _ = cpu_threads.default_threads()
    assert text.count("CPU threads:") == 1 and f"CPU threads: {expected} (" in text
    assert f"threads {expected}\n" in text


def test_the_users_omp_num_threads_is_kept_silently():
    text = _probe({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert "CPU threads:" not in text and "threads 1\n" in text

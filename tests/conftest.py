"""Test settings shared by the whole suite.

Torch runs on one thread unless OMP_NUM_THREADS says otherwise: on the 2 shared cores of CI,
2 threads were measured up to 8x slower than 1.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD1.5-structured model (random weights, seed 0) in both layouts."""
    from library.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def toy_model():
    """The toy-world base (library/toy): pretrained once per clone, cached in .cache/toy/<version>/.

    Read-only: tests must copy it before changing anything in it.
    """
    from library.toy.build import ensure_toy_model

    return ensure_toy_model()


def pytest_collection_modifyitems(config, items):
    """Slow files (`@pytest.mark.slow(cpu_minutes=N)`) first, the longest first, each followed by a
    quick file; then the other quick files.

    How pytest-xdist (make test: --dist loadfile --no-loadscope-reorder) hands out files: one to each
    of the N workers, then a second to each, then the next file to whichever worker has at most 2
    tests left to run. So a worker running the last test of a slow file already holds its next file.
    The order makes that file a quick one, and makes the N longest proofs start at once: the longest
    proof bounds the suite's time, and it must not wait behind another one. (xdist's default reorder,
    by number of tests per file, put the proofs last and one behind another: 35 instead of ~25 min.)
    """
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    cost: dict = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            cost[item.path] = max(cost.get(item.path, 0), marker.kwargs.get("cpu_minutes", 1))
    files: dict = {}  # path -> its items, in collection order
    for item in items:
        files.setdefault(item.path, []).append(item)
    slow = sorted(cost, key=lambda path: -cost[path])  # stable: ties keep collection order
    quick = [path for path in files if path not in cost]
    order = slow[:workers] + quick[:workers]  # the first file of each worker, then its second
    quick = quick[workers:]
    for path in slow[workers:]:
        order.append(path)
        if quick:
            order.append(quick.pop(0))
    order += quick
    items[:] = [item for path in order for item in files[path]]

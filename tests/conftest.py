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
    """Files with slow learning proofs last, the longest first (`@pytest.mark.slow(cpu_minutes=N)`).

    pytest-xdist (make test) hands each worker a first batch of files in this order and then one
    file at a time as workers come free: the quick files fill the first batches, and the long
    proofs then go one to each free worker instead of queueing behind each other on one."""
    cost: dict = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            cost[item.path] = max(cost.get(item.path, 0), marker.kwargs.get("cpu_minutes", 1))
    # stable sort: quick files keep their order, and so do the tests within a file
    items.sort(key=lambda item: (item.path in cost, -cost.get(item.path, 0)))

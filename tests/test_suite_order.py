"""The suite's own collection order (tests/conftest.py): as pytest-xdist hands files out, the longest
learning proofs start at once, one per worker, and a worker finishing a proof holds a quick file next."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import pytest_collection_modifyitems


def item(path, minutes=None):
    marker = None if minutes is None else SimpleNamespace(kwargs={} if minutes == 0 else {"cpu_minutes": minutes})
    return SimpleNamespace(path=Path(path), get_closest_marker=lambda name: marker if name == "slow" else None)


def order(items, workers, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
    pytest_collection_modifyitems(None, items)
    return [str(i.path) for i in items]


@pytest.mark.parametrize("workers, expected", [
    # two workers: d and a start at once, q1/q2 are their second files, then c (1 minute) with q3
    (2, ["d.py", "a.py", "q1.py", "q2.py", "c.py", "c.py", "q3.py", "q4.py"]),
    # one worker (no xdist): every proof followed by a quick file
    (1, ["d.py", "q1.py", "a.py", "q2.py", "c.py", "c.py", "q3.py", "q4.py"]),
])
def test_longest_proofs_first_one_per_worker_each_followed_by_a_quick_file(workers, expected, monkeypatch):
    items = [item("q1.py"), item("a.py", 3), item("c.py", 0), item("q2.py"), item("c.py"), item("d.py", 10),
             item("q3.py"), item("q4.py")]
    assert order(items, workers, monkeypatch) == expected


def test_tests_of_a_file_stay_together_in_their_order(monkeypatch):
    first, second = item("s.py", 5), item("s.py")
    items = [item("q.py"), first, item("r.py"), second]
    order(items, 2, monkeypatch)
    assert items.index(second) == items.index(first) + 1


def test_artifact_recorder_prints_and_keeps_every_number(tmp_path, monkeypatch, capsys):
    import tests.helpers as helpers

    monkeypatch.setattr(helpers, "__file__", str(tmp_path / "tests" / "helpers.py"))
    record = helpers.artifact_recorder("proof.json")
    record("a", 1)
    record("b", {"c": 0.5})
    import json

    assert json.loads((tmp_path / "test-artifacts" / "proof.json").read_text()) == {"a": 1, "b": {"c": 0.5}}
    assert capsys.readouterr().out == "a: 1\nb: {'c': 0.5}\n"

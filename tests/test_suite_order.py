"""The suite's own collection order (tests/conftest.py): quick files first, then the files with slow
tests, the longest first."""
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import pytest_collection_modifyitems


def item(path, minutes=None):
    marker = None if minutes is None else SimpleNamespace(kwargs={} if minutes == 0 else {"cpu_minutes": minutes})
    return SimpleNamespace(path=Path(path), get_closest_marker=lambda name: marker if name == "slow" else None)


def test_quick_files_first_then_slow_files_longest_first():
    items = [item("a.py", 3), item("b.py"), item("c.py", 0), item("c.py"), item("d.py", 10), item("e.py")]
    pytest_collection_modifyitems(None, items)
    assert [str(i.path) for i in items] == ["b.py", "e.py", "d.py", "a.py", "c.py", "c.py"]

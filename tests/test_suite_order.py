"""The suite's own collection order (tests/conftest.py): files with slow tests run first."""
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import pytest_collection_modifyitems


def item(path, slow=False):
    return SimpleNamespace(path=Path(path), get_closest_marker=lambda name: object() if slow and name == "slow" else None)


def test_files_with_slow_tests_come_first_and_keep_their_order():
    items = [item("a.py"), item("b.py"), item("b.py", slow=True), item("c.py"), item("d.py", slow=True)]
    pytest_collection_modifyitems(None, items)
    assert [str(i.path) for i in items] == ["b.py", "b.py", "d.py", "a.py", "c.py"]

"""Atomic writes: a failure (or a kill) mid-write never leaves a half-written or missing output."""
from __future__ import annotations

import os
import stat

import pytest

from library.errors import UserError
from library.fileio import atomic_dir, atomic_path, check_writable_dir, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_successful_write_replaces_with_normal_permissions(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    state = tmp_path / "last-state"
    with atomic_dir(state) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(state) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (state / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-state"]
    with atomic_dir(state) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in state.iterdir()) == ["b"]


def test_check_writable_dir_names_flag_and_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError) as err:
        check_writable_dir(blocker / "out", "--output_dir")
    assert "--output_dir" in str(err.value) and str(blocker / "out") in str(err.value)


def test_file_lock_makes_a_second_holder_wait(tmp_path):
    import threading
    import time

    from library.fileio import file_lock

    lock = tmp_path / "sub" / ".build.lock"
    events = []
    inside = threading.Event()

    def second():
        inside.wait()
        with file_lock(lock):
            events.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with file_lock(lock):
        inside.set()
        time.sleep(0.3)  # the second holder must still be waiting here
        events.append("first out")
    thread.join(5)
    assert events == ["first out", "second in"]

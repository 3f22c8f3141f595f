"""Fixtures for the GUI tests: a private Xvfb display, an App in a fresh GUI home, event-loop
pumping and screenshots. Import the fixtures into a test module:

    from tests.gui_fixtures import app, gui_display, make_app, pump, screenshot, wait_until  # noqa: F401

Tests skip (not fail) only when there is no DISPLAY and no Xvfb to start one.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "gui"


_XVFB: dict = {}


def _stop_xvfb():
    proc = _XVFB.pop("proc", None)
    if proc is not None:
        proc.terminate()
        proc.wait(5)


def _start_xvfb() -> str | None:
    """One Xvfb for the whole test process, stopped at exit. Tk keeps its connection to a
    display after the last window is gone, and Xlib exits the process (status 1) if that
    server dies, so the server must outlive every test module."""
    if "display" in _XVFB:
        return _XVFB["display"]
    with tempfile.TemporaryFile("w+") as fh:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(fh.fileno()), "-screen", "0", "1280x900x24",
                                 "-nolisten", "tcp"], pass_fds=(fh.fileno(),),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        number = ""
        end = time.monotonic() + 10
        while time.monotonic() < end and not number.endswith("\n"):
            fh.seek(0)
            number = fh.read()
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    if not number.strip():
        proc.kill()
        return None
    _XVFB.update(proc=proc, display=f":{number.strip()}")
    atexit.register(_stop_xvfb)
    return _XVFB["display"]


@pytest.fixture(scope="module")
def gui_display():
    """A private Xvfb (the display number chosen by Xvfb itself, so parallel runs never clash)."""
    display = os.environ.get("SDT_GUI_TEST_DISPLAY")   # reuse one, e.g. under xvfb-run
    if not display:
        if not shutil.which("Xvfb"):
            pytest.skip("no Xvfb to run the GUI under (apt-get install xvfb)")
        display = _start_xvfb()
        if display is None:
            pytest.skip("Xvfb did not start")
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    yield display
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old


def pump(root, seconds: float = 0.0):
    end = time.monotonic() + seconds
    while True:
        root.update()
        if time.monotonic() >= end:
            return
        time.sleep(0.01)


def wait_until(root, cond, timeout: float = 10.0, step: float = 0.02) -> bool:
    """Run the Tk event loop until cond() is true (instead of mainloop)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        root.update()
        if cond():
            return True
        time.sleep(step)
    root.update()
    return bool(cond())


def screenshot(root, name: str) -> Path:
    """Save the window as test-artifacts/gui/<name>.png (tooltips and dialogs on top included)."""
    from PIL import ImageGrab

    root.update()
    x, y, w, h = root.winfo_rootx(), root.winfo_rooty(), root.winfo_width(), root.winfo_height()
    # the menu bar sits above the client area, inside the window frame at `wm geometry`'s origin
    top = min(y, int(root.geometry().split("+")[2]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    ImageGrab.grab(bbox=(x, top, x + w, y + h), xdisplay=os.environ["DISPLAY"]).save(path)
    return path


@pytest.fixture
def gui_home(tmp_path, monkeypatch):
    home = tmp_path / "gui home"
    monkeypatch.setenv("SDT_GUI_HOME", str(home))
    return home


@pytest.fixture
def make_app(gui_display, gui_home, tmp_path):
    """make_app(**kw) -> App in a fresh Tk; every app made is closed after the test."""
    import tkinter as tk

    from gui.app import App

    made = []

    def make(**kw):
        kw.setdefault("cwd", str(tmp_path))
        kw.setdefault("theme_mode", "light")
        root = tk.Tk()
        app = App(root, **kw)
        made.append(app)
        root.update()
        return app

    yield make
    errors = []
    for app in made:
        try:
            app.on_close(force=True)
        except Exception as err:   # still destroy the window, then report
            errors.append(err)
            try:
                app.root.destroy()
            except Exception:
                pass
    if errors:
        raise errors[0]
    import tkinter

    assert tkinter._default_root is None, "a Tk root was left behind"


@pytest.fixture
def app(make_app):
    return make_app()


KEYSYMS = {".": "period", "-": "minus", "/": "slash", " ": "space", "_": "underscore", ",": "comma",
           "=": "equal", ":": "colon", "+": "plus"}


def reveal(root, widget):
    """Scroll the form so the widget is on screen, as a user would before clicking it."""
    holder = widget.master
    while holder is not None and not hasattr(holder, "scroll_to"):
        holder = holder.master
    if holder is not None:
        holder.scroll_to(widget)
    root.update()


def type_text(root, widget, text: str, clear: bool = True):
    """Type into an entry with real key events (ASCII lower case, digits, common punctuation)."""
    reveal(root, widget)
    widget.focus_force()
    root.update()
    if clear:
        widget.delete(0, "end")
    for ch in text:
        widget.event_generate("<KeyPress>", keysym=KEYSYMS.get(ch, ch))
    root.update()
    assert not clear or widget.get() == text, f"typed {text!r} but the entry holds {widget.get()!r} " \
                                             f"(focus: {root.focus_get()})"


def paste_text(root, widget, text: str, clear: bool = True):
    """Paste into an entry through the clipboard (for paths with spaces and non-ASCII letters)."""
    reveal(root, widget)
    widget.focus_force()
    if clear:
        widget.delete(0, "end")
    root.clipboard_clear()
    root.clipboard_append(text)
    root.update()
    widget.event_generate("<<Paste>>")
    root.update()


def choose(root, combobox, value: str):
    """Pick a dropdown value as a user would (the selection event included)."""
    combobox.set(value)
    combobox.event_generate("<<ComboboxSelected>>")
    root.update()

"""The last session: every tab's form (as a preset file), which preset it came from, the open
tab, theme, launcher and window size. Written on close, restored on start."""
from __future__ import annotations

from pathlib import Path

from gui import presets
from library.fileio import write_text_atomic


def save_session(app) -> None:
    # root.geometry() is the frame's position as set; winfo_geometry() is the client area's,
    # which sits below the menu bar / title bar and moved the window down on every restart
    from gui.fields import LAST_DIRS

    data = {"last_dirs": dict(LAST_DIRS), "theme": app.theme_mode.get(), "geometry": app.root.geometry(), "presets": {},
            "launcher": next((t.launcher_var.get() for t in app.tabs.values()), app.launcher)}
    try:
        data["tab"] = app.notebook.tab(app.notebook.select(), "text")
    except Exception:
        pass
    for module, tab in app.tabs.items():
        values, _ = tab.values()   # entries that do not parse are left out, not saved broken
        write_text_atomic(presets.last_form_path(tab.script),
                          presets.dump(tab.script, values, tab.form.order(), tab.unknown, tab.preset_name))
        data["presets"][tab.script] = str(tab.preset_path) if tab.preset_path else None
    presets.write_session(data)


def restore_tab(app, tab) -> None:
    """Put back the tab's last form (and the preset file it was loaded from)."""
    data = app.session
    last = presets.last_form_path(tab.script)
    source = (data.get("presets") or {}).get(tab.script)
    try:
        if source and Path(source).is_file():
            tab.load_file(source)            # marks the form clean against that file
        if last.is_file():
            preset = presets.load(last, tab.known(), tab.script)
            tab.apply_preset(preset)
            tab.preset_name = preset.name or tab.preset_name
            tab.update_preview()
    except (OSError, ValueError) as err:
        tab.show_notes([f"the last session could not be restored: {err}"])


def restore_session(app) -> None:
    from gui.fields import LAST_DIRS

    data = app.session
    if isinstance(data.get("last_dirs"), dict):
        LAST_DIRS.update({k: v for k, v in data["last_dirs"].items() if isinstance(v, str)})
    for tab in app.tabs.values():
        restore_tab(app, tab)
    wanted = data.get("tab")
    for page in app.notebook.tabs():
        if app.notebook.tab(page, "text") == wanted:
            app.notebook.select(page)


def load_preset_anywhere(app, path) -> None:
    """Load a preset into the tab of the script it names (the first training tab otherwise)."""
    path = Path(path)
    script = presets.parse(path.read_text(encoding="utf-8"), set()).script
    tab = next((t for t in app.tabs.values() if t.script == script), None) or next(iter(app.tabs.values()), None)
    if tab is not None:
        tab.load_file(path)
        app.notebook.select(tab) if tab.entry.kind == "train" else None

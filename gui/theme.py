"""Light/dark colours (following the system where it can be read) and display scaling.

Tk has no portable "system theme" call, so the preference is read where each desktop keeps it;
"light" is the fallback. Fonts are set in points so they follow Tk's DPI scaling on HiDPI screens.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tkinter as tk
from tkinter import font as tkfont
from tkinter import ttk

PALETTES = {
    "light": dict(bg="#f2f2f2", fg="#1d1d1d", field="#ffffff", muted="#5f6368", accent="#2a64c8",
                  error_bg="#ffd6d6", error_fg="#b00020", select="#c9dcff", text_bg="#ffffff",
                  ok="#1b7f3a", warn="#9a5800", border="#c4c4c4", trough="#e2e2e2"),
    "dark": dict(bg="#2b2d30", fg="#e3e3e3", field="#3a3c40", muted="#a2a6ab", accent="#6ea1ff",
                 error_bg="#6b2b2b", error_fg="#ff8a8a", select="#3d5a80", text_bg="#1e1f22",
                 ok="#6fd08f", warn="#f0b35a", border="#55585d", trough="#3a3c40"),
}


_BASE_SCALING: dict[str, float] = {}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=1.5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def system_prefers_dark() -> bool:
    if sys.platform == "darwin":
        return _run(["defaults", "read", "-g", "AppleInterfaceStyle"]).lower() == "dark"
    if sys.platform == "win32":
        try:
            import winreg

            key = winreg.OpenKey(winreg.HKEY_CURRENT_USER,
                                 r"Software\Microsoft\Windows\CurrentVersion\Themes\Personalize")
            return winreg.QueryValueEx(key, "AppsUseLightTheme")[0] == 0
        except OSError:
            return False
    if "dark" in os.environ.get("GTK_THEME", "").lower():
        return True
    if os.environ.get("DISPLAY") and _which("gsettings"):
        scheme = _run(["gsettings", "get", "org.gnome.desktop.interface", "color-scheme"])
        return "dark" in scheme
    return False


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None


def resolve_mode(mode: str) -> str:
    if mode == "system":
        return "dark" if system_prefers_dark() else "light"
    return mode if mode in PALETTES else "light"


def ui_scale(root: tk.Misc) -> float:
    """1.0 at 96 dpi; used to scale pixel sizes (wrap widths, thumbnails, window size)."""
    return float(root.tk.call("tk", "scaling")) / (96 / 72)


def apply_scaling(root: tk.Misc, factor: float | None = None) -> float:
    """Fonts in points follow `tk scaling` (from the display's DPI); `factor` (or SDT_GUI_SCALE,
    or the desktop's GDK_SCALE) multiplies it for screens that report 96 dpi but are HiDPI."""
    if factor is None:
        for var in ("SDT_GUI_SCALE", "GDK_SCALE", "QT_SCALE_FACTOR"):
            try:
                factor = float(os.environ[var])
                break
            except (KeyError, ValueError):
                continue
    # Tk keeps `tk scaling` per display and process (setting it rewrites the screen's size in
    # mm), so the display's own value is remembered the first time and every window sets its own.
    key = root.winfo_screen()
    if key not in _BASE_SCALING:
        _BASE_SCALING[key] = float(root.tk.call("tk", "scaling"))
    root.tk.call("tk", "scaling", _BASE_SCALING[key] * (factor or 1.0))
    sizes = {"TkDefaultFont": 10, "TkTextFont": 10, "TkMenuFont": 10, "TkHeadingFont": 10,
             "TkCaptionFont": 11, "TkTooltipFont": 9, "TkFixedFont": 10, "TkSmallCaptionFont": 9}
    for name, size in sizes.items():
        try:
            tkfont.nametofont(name, root=root).configure(size=size)
        except tk.TclError:
            pass
    return ui_scale(root)


def apply_theme(root: tk.Misc, mode: str = "system") -> dict:
    """Configure ttk styles for the palette; returns the palette (plain Tk widgets use it)."""
    name = resolve_mode(mode)
    p = dict(PALETTES[name], name=name)
    style = ttk.Style(root)
    style.theme_use("clam")   # the one built-in theme whose colours can all be set
    style.configure(".", background=p["bg"], foreground=p["fg"], fieldbackground=p["field"],
                    bordercolor=p["border"], troughcolor=p["trough"], selectbackground=p["select"],
                    selectforeground=p["fg"], insertcolor=p["fg"], lightcolor=p["bg"], darkcolor=p["bg"])
    style.map(".", foreground=[("disabled", p["muted"])], background=[("active", p["select"])])
    style.map("TCombobox", fieldbackground=[("readonly", p["field"])], foreground=[("readonly", p["fg"])],
              selectbackground=[("readonly", p["field"])], selectforeground=[("readonly", p["fg"])])
    style.map("TEntry", fieldbackground=[("readonly", p["bg"])])
    style.configure("TCheckbutton", indicatorbackground=p["field"], indicatorforeground=p["fg"])
    style.map("TCheckbutton", indicatorbackground=[("pressed", p["select"]), ("selected", p["field"])])
    style.map("TButton", background=[("disabled", p["bg"]), ("active", p["select"])],
              foreground=[("disabled", p["muted"])])
    style.configure("Horizontal.TProgressbar", background=p["accent"], troughcolor=p["trough"],
                    bordercolor=p["border"], lightcolor=p["accent"], darkcolor=p["accent"])
    style.configure("TNotebook.Tab", padding=(12, 4))
    style.map("TNotebook.Tab", background=[("selected", p["field"])])
    style.configure("Treeview", background=p["text_bg"], fieldbackground=p["text_bg"], foreground=p["fg"])
    style.map("Treeview", background=[("selected", p["select"])])
    bold = tkfont.nametofont("TkDefaultFont", root=root).copy()
    bold.configure(weight="bold")
    small = tkfont.nametofont("TkDefaultFont", root=root).copy()
    small.configure(size=9)
    root._sdt_fonts = (bold, small)   # keep references: Tk forgets fonts Python drops
    style.configure("Field.TLabel", foreground=p["fg"])
    style.configure("Help.TLabel", foreground=p["muted"], font=small)
    style.configure("Problem.TLabel", foreground=p["error_fg"], font=small)
    style.configure("Heading.TLabel", font=bold)
    style.configure("Error.TLabel", foreground=p["error_fg"], font=bold)
    style.configure("Warn.TLabel", foreground=p["warn"])
    style.configure("Ok.TLabel", foreground=p["ok"], font=bold)
    style.configure("Stopped.TLabel", foreground=p["warn"], font=bold)
    style.configure("Muted.TLabel", foreground=p["muted"])
    style.configure("Link.TButton", foreground=p["accent"], background=p["bg"], relief="flat", borderwidth=0,
                    padding=(0, 1))
    style.map("Link.TButton", background=[("active", p["bg"])], foreground=[("active", p["fg"])])
    style.configure("TLabelframe.Label", font=bold, foreground=p["fg"])
    style.configure("Error.TEntry", fieldbackground=p["error_bg"])
    style.configure("Error.TCombobox", fieldbackground=p["error_bg"])
    style.map("Error.TCombobox", fieldbackground=[("readonly", p["error_bg"])])
    style.configure("Error.TCheckbutton", foreground=p["error_fg"])
    style.configure("Accent.TButton", foreground=p["accent"], font=bold)
    root.configure(background=p["bg"]) if isinstance(root, (tk.Tk, tk.Toplevel)) else None
    root.option_add("*Text.background", p["text_bg"])
    root.option_add("*Text.foreground", p["fg"])
    root.option_add("*Canvas.background", p["bg"])
    root.option_add("*Listbox.background", p["text_bg"])
    root.option_add("*Listbox.foreground", p["fg"])
    root.option_add("*Menu.background", p["bg"])
    root.option_add("*Menu.foreground", p["fg"])
    root.option_add("*TCombobox*Listbox.background", p["field"])
    root.option_add("*TCombobox*Listbox.foreground", p["fg"])
    root._sdt_palette = p
    return p


def palette(widget: tk.Misc) -> dict:
    return getattr(widget._root(), "_sdt_palette", dict(PALETTES["light"], name="light"))


def restyle_plain(widget: tk.Misc) -> None:
    """Apply the palette to plain Tk widgets (Text, Canvas) that ttk styles do not reach."""
    p = palette(widget)
    for child in [widget, *_descendants(widget)]:
        cls = child.winfo_class()
        try:
            if cls == "Text":
                child.configure(background=p["text_bg"], foreground=p["fg"], insertbackground=p["fg"])
            elif cls in ("Canvas", "Frame", "Toplevel"):
                child.configure(background=p["bg"])
        except tk.TclError:
            pass


def _descendants(widget):
    for child in widget.winfo_children():
        yield child
        yield from _descendants(child)

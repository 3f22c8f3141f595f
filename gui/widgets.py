"""Small Tk helpers: tooltips that behave, a scrollable frame, a non-blocking dialog."""
from __future__ import annotations

import time
import tkinter as tk
from tkinter import ttk

from tktooltip import ToolTip
from tktooltip.tooltip import ToolTipStatus


class Tip(ToolTip):
    """tkinter-tooltip with two fixes.

    1. It is lifted when shown: a tooltip Toplevel created before the main window is mapped
       stays below it on a bare X server (no window manager) and is never seen.
    2. Its after() timers are tracked and cancelled on close; otherwise they fire into a
       destroyed interpreter ("invalid command name").
    """

    def __init__(self, widget, msg, **kw):
        self._timer = None
        super().__init__(widget, msg, **kw)

    def _schedule(self, ms: int):
        self._cancel()
        self._timer = self.after(ms, self._show)

    def _cancel(self):
        if self._timer is not None:
            try:
                self.after_cancel(self._timer)
            except tk.TclError:
                pass
            self._timer = None

    def on_enter(self, event):
        self.last_moved = time.perf_counter()
        self.status = ToolTipStatus.INSIDE
        self._update_tooltip_coords(event)
        self._schedule(int(self.delay * self.S_TO_MS))

    def on_leave(self, event=None):
        self._cancel()
        super().on_leave(event)

    def _show(self):
        self._timer = None
        if self.status == ToolTipStatus.INSIDE and time.perf_counter() - self.last_moved >= self.delay:
            self.status = ToolTipStatus.VISIBLE
        if self.status == ToolTipStatus.VISIBLE:
            self._update_message()
            self.deiconify()
            self.lift()
            self._schedule(int(self.refresh * self.S_TO_MS))

    def close(self):
        self._cancel()
        self.status = ToolTipStatus.OUTSIDE
        self.destroy()


def _tips(widget) -> list:
    root = widget._root()
    if not hasattr(root, "_sdt_tips"):
        root._sdt_tips = []
    return root._sdt_tips


def attach_tip(widget, msg, delay: float = 0.4, width: int = 460):
    """Hover help for a widget. The Tip (a Toplevel) is made on first hover: a form has hundreds
    of options and one X window each up front would slow the start."""
    state = {}

    def first_enter(event):
        if "tip" not in state:
            # an explicit master: with several Tk roots (tests) the default root may be another one
            tip = Tip(widget, msg, delay=delay, follow=True, refresh=0.5, width=width,
                      parent_kwargs={"master": widget.winfo_toplevel(), "bg": "#000000", "padx": 1, "pady": 1},
                      bg="#ffffe0", fg="#000000", padx=6, pady=4)
            state["tip"] = tip
            _tips(widget).append(tip)
            widget.unbind("<Enter>", state.pop("bind_id"))
            tip.on_enter(event)

    state["bind_id"] = widget.bind("<Enter>", first_enter, add="+")
    return state


def close_tips(root) -> None:
    for tip in getattr(root, "_sdt_tips", []):
        try:
            tip.close()
        except tk.TclError:
            pass
    root._sdt_tips = []


class ScrollFrame(ttk.Frame):
    """A vertically scrolling frame; put children in `.inner`."""

    def __init__(self, master, **kw):
        super().__init__(master, **kw)
        self.canvas = tk.Canvas(self, highlightthickness=0, borderwidth=0)
        self.bar = ttk.Scrollbar(self, orient="vertical", command=self.canvas.yview)
        self.canvas.configure(yscrollcommand=self.bar.set)
        self.inner = ttk.Frame(self.canvas)
        self._win = self.canvas.create_window(0, 0, window=self.inner, anchor="nw")
        self.canvas.grid(row=0, column=0, sticky="nsew")
        self.bar.grid(row=0, column=1, sticky="ns")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(0, weight=1)
        self.inner.bind("<Configure>", lambda e: self.canvas.configure(scrollregion=self.canvas.bbox("all")))
        self.canvas.bind("<Configure>", lambda e: self.canvas.itemconfigure(self._win, width=e.width))
        for w in (self.canvas, self.inner):
            w.bind("<Enter>", self._bind_wheel, add="+")
            w.bind("<Leave>", self._unbind_wheel, add="+")

    def _bind_wheel(self, _event=None):
        self.bind_all("<MouseWheel>", self._wheel)
        self.bind_all("<Button-4>", self._wheel)
        self.bind_all("<Button-5>", self._wheel)

    def _unbind_wheel(self, _event=None):
        for seq in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
            self.unbind_all(seq)

    def _wheel(self, event):
        if getattr(event, "num", None) == 4 or getattr(event, "delta", 0) > 0:
            self.canvas.yview_scroll(-3, "units")
        else:
            self.canvas.yview_scroll(3, "units")

    def scroll_to(self, widget) -> None:
        """Scroll so that `widget` (inside .inner) is in view (keyboard focus, marked errors)."""
        self.update_idletasks()
        total = max(1, self.inner.winfo_height())
        y = widget.winfo_rooty() - self.inner.winfo_rooty()
        top, bottom = self.canvas.yview()
        view_top, view_bottom = top * total, bottom * total
        if y < view_top or y + widget.winfo_height() > view_bottom:
            self.canvas.yview_moveto(max(0.0, (y - 40) / total))


class Dialog(tk.Toplevel):
    """A non-blocking message window (messagebox would block the event loop and the tests)."""

    def __init__(self, master, title: str, heading: str, body: str, kind: str = "info"):
        super().__init__(master)
        self.title(title)
        self.transient(master.winfo_toplevel())
        frame = ttk.Frame(self, padding=12)
        frame.pack(fill="both", expand=True)
        style = {"error": "Error.TLabel", "warning": "Warn.TLabel"}.get(kind, "Heading.TLabel")
        ttk.Label(frame, text=heading, style=style, wraplength=640, justify="left").pack(anchor="w")
        rows = sum(1 + len(line) // 88 for line in body.splitlines())   # wrapped lines, roughly
        self.text = tk.Text(frame, height=min(24, max(4, rows + 1)), width=90, wrap="word", relief="flat")
        self.text.insert("1.0", body)
        self.text.configure(state="disabled")
        self.text.pack(fill="both", expand=True, pady=(8, 8))
        self.ok = ttk.Button(frame, text="OK", command=self.destroy)
        self.ok.pack(anchor="e")
        self.bind("<Escape>", lambda e: self.destroy())
        self.bind("<Return>", lambda e: self.destroy())
        self.ok.focus_set()
        top = master.winfo_toplevel()   # over the main window, not at the screen's corner
        self.geometry(f"+{top.winfo_rootx() + 60}+{top.winfo_rooty() + 80}")

"""A script's form, generated from its argparse parser: one widget per option, grouped into
sections by gui/layout.py, with the uncommon options under a collapsed "Advanced" part.

Widget choice: a flag (store_true) is a checkbox, an option with choices a dropdown, anything else
an entry (lists are space-separated, quoted like a shell). Help text is shown beside the widget
and as a tooltip; a bad value is marked on the field itself.
"""
from __future__ import annotations

import tkinter as tk
from tkinter import ttk

from gui import layout
from gui.fields import Field
from gui.specs import FieldSpec, is_default, specs_from_parser
from gui.widgets import ScrollFrame

BOOL_COLUMNS = 3


class Section:
    """A LabelFrame of fields: common ones, then a collapsible Advanced part."""

    def __init__(self, form: "Form", parent, title: str, common: list[Field], advanced: list[Field], row: int):
        self.form, self.title = form, title
        self.frame = ttk.LabelFrame(parent, text=title, padding=(8, 4))
        self.frame.grid(row=row, column=0, sticky="ew", padx=6, pady=4)
        self.frame.columnconfigure(0, weight=1)
        self.common, self.advanced = common, advanced
        self.main = self._part(self.frame, common, 0)
        self.expanded = tk.BooleanVar(parent, value=False)
        self.adv_frame = None
        if advanced:
            self.toggle = ttk.Button(self.frame, style="Link.TButton", command=self.toggle_advanced,
                                     takefocus=True)
            self.toggle.grid(row=1, column=0, sticky="w", pady=(2, 0))
            self.adv_frame = self._part(self.frame, advanced, 2)
            self.adv_frame.grid_remove()
        for f in common + advanced:
            f.section = self

    def toggle_advanced(self):
        self.expanded.set(not self.expanded.get())
        self.refresh()

    def _part(self, parent, fields: list[Field], row: int):
        frame = ttk.Frame(parent)
        frame.grid(row=row, column=0, sticky="ew")
        frame.columnconfigure(1, weight=1)
        grid_row = 0
        for f in fields:
            if f.spec.kind != "bool":
                f.build_row(frame, grid_row)
                grid_row += 1
        bools = [f for f in fields if f.spec.kind == "bool"]
        frame.bool_frame = ttk.Frame(frame)
        frame.bool_frame.grid(row=2 * grid_row, column=0, columnspan=4, sticky="w", padx=(4, 0), pady=(2, 2))
        for f in bools:
            f.build_bool(frame.bool_frame)
        frame.bools = bools
        return frame

    def refresh(self):
        """Apply filter, visibility rules and the Advanced toggle."""
        query = self.form.filter_text
        any_visible = False
        for part, fields in ((self.main, self.common), (self.adv_frame, self.advanced)):
            if part is None:
                continue
            for f in fields:
                f.show(self.form.wanted(f))
            shown = [f for f in part.bools if f.visible]
            for f in part.bools:
                f.widget.grid_forget()
            for i, f in enumerate(shown):
                f.widget.grid(row=i // BOOL_COLUMNS, column=i % BOOL_COLUMNS, sticky="w", padx=(0, 18))
            # a grid whose last child is removed keeps its old size (a blank gap under Find):
            # hide the empty containers themselves
            part.bool_frame.grid() if shown else part.bool_frame.grid_remove()
            part.has_visible = any(f.visible for f in fields)
            if part is self.main:
                part.grid() if part.has_visible else part.grid_remove()
            any_visible |= any(f.visible for f in fields)
        if self.adv_frame is not None:
            open_ = self.expanded.get() or bool(query)
            self.toggle.configure(text=f"{'▾' if open_ else '▸'} Advanced options ({len(self.advanced)})")
            self.adv_frame.grid() if open_ and self.adv_frame.has_visible else self.adv_frame.grid_remove()
            if query and not any(f.visible for f in self.advanced):
                self.toggle.grid_remove()
            else:
                self.toggle.grid()
        visible = any_visible if query else True
        self.frame.grid() if visible else self.frame.grid_remove()


class Form:
    """All fields of one script, in a scrolling frame."""

    def __init__(self, parent, parser, kind: str = "train", on_change=None, help_wrap: int = 380):
        self.parser = parser
        self.on_change = on_change
        self.help_wrap = help_wrap
        self.filter_text = ""
        self._loading = 0
        self.algo = None
        self.specs = specs_from_parser(parser)
        self.fields: dict[str, Field] = {}
        for spec in self.specs:
            kind_ = layout.path_kind(spec.dest, spec.kind == "list") if spec.kind in ("text", "list") else None
            self.fields[spec.dest] = Field(self, spec, kind_)
        self.required = layout.required_for(kind, set(self.fields))
        self.required += [s.dest for s in self.specs if s.required and s.dest not in self.required]
        for item in self.required:
            if isinstance(item, str):
                self.fields[item].needed = True   # marked with * (argparse does not require it)
        self.scroll = ScrollFrame(parent)
        self.sections: list[Section] = []
        self._build()
        self.algo = self._build_algo_choice()
        self._loading += 1
        for f in self.fields.values():
            f.reset()
        self._loading -= 1
        self.refresh()

    def _build(self):
        # what a run cannot do without comes first, in one section (kohya_ss users look for
        # "model, images, output" at the top); the rest by argparse group
        first = [self.fields[n] for item in self.required for n in (item if isinstance(item, tuple) else (item,))
                 if n in self.fields and self.fields[n].spec.kind != "bool"]
        first = list(dict.fromkeys(first))
        offset = 0
        if first:
            self.sections.append(Section(self, self.scroll.inner, "Start here", first, [], 0))
            offset = 1
        taken = {f.spec.dest for f in first}
        by_group: dict[str, list[FieldSpec]] = {}
        for spec in self.specs:
            if spec.dest not in taken:
                by_group.setdefault(spec.group.lower(), []).append(spec)
        for row, key in enumerate(layout.section_keys(list(by_group)), start=offset):
            title, common_names = layout.section_of(key, [s.dest for s in by_group[key]] + sorted(taken))
            specs = by_group[key]
            if common_names is None:   # a group the layout does not know: everything is common
                common = [self.fields[s.dest] for s in specs]
                advanced = []
            else:
                # required options are never tucked away under Advanced
                names = common_names + [s.dest for s in specs if self.fields[s.dest].needed and s.dest not in common_names]
                common = [self.fields[n] for n in names if n in self.fields and n not in taken
                          and self.fields[n].spec.group.lower() == key]
                advanced = [self.fields[s.dest] for s in specs if self.fields[s.dest] not in common]
            self.sections.append(Section(self, self.scroll.inner, title, common, advanced, row))
        self.scroll.inner.columnconfigure(0, weight=1)
        self._align_columns()

    def _build_algo_choice(self):
        """LyCORIS's algorithm as a dropdown beside the network type, shown for a LyCORIS module;
        it is the `algo=` item of network_args (kohya's way of passing it)."""
        module, args = self.fields.get("network_module"), self.fields.get("network_args")
        if module is None or args is None or not hasattr(module, "buttons"):
            return None
        self.algo_var = tk.StringVar(module.buttons, value="")
        self.algo_label = ttk.Label(module.buttons, text="algorithm")
        box = ttk.Combobox(module.buttons, textvariable=self.algo_var, values=layout.LYCORIS_ALGOS,
                           state="readonly", width=7, name="algo")
        box.bind("<<ComboboxSelected>>", lambda e: self._algo_chosen())
        from gui.widgets import attach_tip
        attach_tip(box, lambda: "LyCORIS algorithm: written into network_args as algo=<name>\n"
                                "lora, locon (LoRA + conv layers), loha, lokr, dora")
        return box

    def _algo_items(self) -> list[str]:
        value = self.fields["network_args"].current()
        return list(value) if isinstance(value, (list, tuple)) else []

    def _algo_chosen(self):
        items = [i for i in self._algo_items() if not str(i).startswith("algo=")]
        self.fields["network_args"].set_value([f"algo={self.algo_var.get()}"] + items)

    def sync_algo(self):
        if self.algo is None:
            return
        if layout.is_lycoris(self.fields["network_module"].current()):
            algo = next((str(i)[5:] for i in self._algo_items() if str(i).startswith("algo=")), "lora")
            self.algo_var.set(algo)
            if not self.algo.winfo_manager():
                self.algo_label.pack(side="left", padx=(4, 2))
                self.algo.pack(side="left")
        else:
            self.algo_label.pack_forget()
            self.algo.pack_forget()

    def _align_columns(self):
        """Same label and button column widths in every section, so the fields line up."""
        from tkinter import font as tkfont

        measure = tkfont.nametofont("TkDefaultFont").measure
        rows = [f for f in self.fields.values() if f.spec.kind != "bool"]
        if not rows:
            return
        label_w = max(measure(f.label.cget("text")) for f in rows) + 16
        # two "Folder…" buttons at most (measured from the font: no layout pass needed)
        button_w = measure("0") * 16 + 40 if any(f.path_kind for f in rows) else 8
        for part in self._parts():
            part.columnconfigure(0, minsize=label_w)
            part.columnconfigure(2, minsize=button_w)
        # the width the fields need without their help text (sections' padding included)
        self._label_w = label_w
        self._fixed_w = label_w + measure("0") * 40 + 16 + button_w + 60
        self._help_side = None
        self.scroll.canvas.bind("<Configure>", lambda e: self.layout_help(e.width), add="+")

    def _parts(self):
        return [p for s in self.sections for p in (s.main, s.adv_frame) if p is not None]

    def layout_help(self, width: int):
        """Help beside the widgets when the window is wide enough, else under them (HiDPI,
        small screens): the entries never get squeezed."""
        room = width - self._fixed_w
        side = "right" if room >= self.help_wrap * 0.8 else "below"
        wrap = min(room, int(self.help_wrap * 1.4)) if side == "right" else max(200, width - self._label_w - 60)
        if (side, wrap) == self._help_side:
            return
        self._help_side = (side, wrap)
        for part in self._parts():
            part.columnconfigure(3, minsize=wrap + 8 if side == "right" else 0)
        for f in self.fields.values():
            if f.spec.kind != "bool":
                f.place_help(side, wrap)

    # -- visibility ------------------------------------------------------------------------
    def get(self, dest):
        if dest not in self.fields:
            raise KeyError(dest)
        return self.fields[dest].current()

    def wanted(self, f: Field) -> bool:
        if self.filter_text:
            q = self.filter_text.lower()
            return q in f.spec.dest.lower() or q in f.label_text().lower() or q in f.spec.help.lower()
        rule = layout.SHOW_IF.get(f.spec.dest)
        return rule is None or f.is_set() or f.problem is not None or layout.condition_holds(rule, self.get)

    def set_filter(self, text: str):
        self.filter_text = text.strip()
        self.refresh()

    def refresh(self):
        for s in self.sections:
            s.refresh()
        self.sync_algo()

    def changed(self, field: Field):
        if self._loading:
            return
        if field.problem:
            # the same problem on other fields (one of train_data_dir / dataset_config, a bucket
            # range on min and max) is fixed by this edit as well: unmark them all
            for other in self.fields.values():
                if other.problem == field.problem and other is not field:
                    other.mark(None)
            field.mark(None)
        if field.spec.dest in _controllers():
            self.refresh()
        elif field.spec.dest in ("network_module", "network_args"):
            self.sync_algo()
        if self.on_change:
            self.on_change()

    # -- values ----------------------------------------------------------------------------
    def values(self) -> tuple[dict, dict]:
        """(non-default values in form order, {dest: problem} for entries that do not parse)."""
        values, problems = {}, {}
        for dest, f in self.fields.items():
            try:
                value = f.value()
            except ValueError as err:
                problems[dest] = str(err)
                continue
            if not is_default(f.spec, value):
                values[dest] = value
        return values, problems

    def set_values(self, values: dict):
        """Reset every field to its default, then apply `values` (a preset)."""
        self._loading += 1
        try:
            for dest, f in self.fields.items():
                f.mark(None)
                f.set_value(values[dest]) if dest in values else f.reset()
        finally:
            self._loading -= 1
        self.refresh()
        if self.on_change:
            self.on_change()

    def order(self) -> list[str]:
        return [f.spec.dest for s in self.sections for f in s.common + s.advanced]

    def mark(self, problems: dict[str, str]):
        for dest, f in self.fields.items():
            f.mark(problems.get(dest))
        self.refresh()
        first = next((self.fields[d] for d in self.order() if d in problems), None)
        if first is not None:
            if first.section and first in first.section.advanced:
                first.section.expanded.set(True)
                first.section.refresh()
            self.scroll.scroll_to(first.widget)


def _controllers() -> set[str]:
    """Options whose value decides whether others are shown."""
    out = set()
    for rule in layout.SHOW_IF.values():
        for cond in rule if isinstance(rule, list) else [rule]:
            out.add(cond[0])
    return out

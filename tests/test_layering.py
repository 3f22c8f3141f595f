"""Import layering, read from the source with ast (nothing is imported).

The layers, bottom to top:

- `library/` (split by concern into packages such as library.data, library.training, and a few
  modules such as library.errors) and the network modules of `networks/` (lora.py, lora_blocks.py,
  lora_format.py: what `--network_module` loads);
- `gui/`;
- the entry scripts: the top-level `*.py`, kohya's LoRA tool scripts in `networks/`
  (merge_lora.py, ...), `tools/` and `bench/`. A script may import anything; nothing imports a
  top-level script except another script or the GUI (which builds its forms from their parsers).

Rules checked here:
1. no module of library/ or networks/ imports a top-level script;
2. library/logs.py (used by every layer) imports nothing from library.training;
3. no import cycle between packages (each library subpackage or library module, `networks`, `gui`
   is one node; the scripts are not nodes).
Every failure names the importing file, its line and the imported module.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("tools", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_tool_script(path: Path) -> bool:
    """kohya's LoRA tools live in networks/ as scripts (`python networks/merge_lora.py`)."""
    return path.parent.name == "networks" and "__main__" in path.read_text(encoding="utf-8")


def source_files() -> list[Path]:
    files = sorted(REPO.glob("*.py"))
    for folder in ("library", "networks", "gui", *SCRIPT_DIRS):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def top_level_scripts() -> set[str]:
    return {p.stem for p in REPO.glob("*.py")}


def is_script(path: Path) -> bool:
    rel = path.relative_to(REPO)
    return len(rel.parts) == 1 or rel.parts[0] in SCRIPT_DIRS or _is_tool_script(path)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, also those inside functions; `from a import b`
    yields a and a.b (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            out += [(f"{module}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return out


def package_of(module: str) -> str | None:
    """The layering node of a module of ours, None for third-party modules and scripts."""
    parts = module.split(".")
    if parts[0] == "library":
        return ".".join(parts[:2]) if len(parts) > 1 else "library"
    if parts[0] in ("networks", "gui"):
        return parts[0]
    return None


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(REPO)}:{line} imports {module}"


def library_imports_of_scripts() -> list[str]:
    scripts = top_level_scripts()
    return [_where(path, line, module)
            for path in source_files() if path.relative_to(REPO).parts[0] in ("library", "networks")
            and not is_script(path)
            for module, line in imports_of(path) if module.split(".")[0] in scripts]


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer's package, imported package) -> where, over every non-script module."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in source_files():
        if is_script(path):
            continue
        source = package_of(_module_name(path))
        for module, line in imports_of(path):
            target = package_of(module)
            if source and target and source != target and target != "library":
                edges.setdefault((source, target), []).append(_where(path, line, module))
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_whole_project():
    files = {str(p.relative_to(REPO)) for p in source_files()}
    assert {"train_network.py", "library/logs.py", "networks/lora.py", "gui/app.py",
            "tools/demo.py", "bench/run_all.py"} <= files
    assert is_script(REPO / "networks" / "merge_lora.py") and not is_script(REPO / "networks" / "lora.py")
    assert ("library.errors.UserError", 17) in imports_of(REPO / "networks" / "lora.py")


def test_library_does_not_import_top_level_scripts():
    bad = library_imports_of_scripts()
    assert not bad, ("library/ and networks/ must not import an entry script (move what they need into "
                     "library/ and let the script call it):\n  " + "\n  ".join(bad))


def logs_imports_of_training() -> list[str]:
    path = REPO / "library" / "logs.py"
    return [_where(path, line, module) for module, line in imports_of(path) if module.startswith("library.training")]


def test_logs_does_not_reach_up_into_training():
    bad = logs_imports_of_training()
    assert not bad, "library/logs.py sits below library/training/:\n  " + "\n  ".join(bad)


def test_no_import_cycles_between_packages():
    edges = package_edges()
    problems = []
    for component in cycles(edges):
        lines = [f"cycle between {', '.join(component)}:"]
        for (a, b), where in sorted(edges.items()):
            if a in component and b in component:
                lines += [f"  {a} -> {b}: " + "; ".join(sorted(set(where))[:3])]
        problems.append("\n".join(lines))
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_claim(tmp_path, monkeypatch):
    """A fake project with each fault: every check reports it."""
    (tmp_path / "library" / "training").mkdir(parents=True)
    (tmp_path / "networks").mkdir()
    (tmp_path / "train_x.py").write_text("import library.a\n")
    (tmp_path / "library" / "__init__.py").write_text("")
    (tmp_path / "library" / "a.py").write_text("def f():\n    import train_x\n")
    (tmp_path / "library" / "logs.py").write_text("from library.training.accel import reduce_sum\n")
    (tmp_path / "library" / "training" / "__init__.py").write_text("")
    (tmp_path / "library" / "training" / "accel.py").write_text("from networks import lora\n")
    (tmp_path / "networks" / "lora.py").write_text("from ..library.training import accel\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert library_imports_of_scripts() == ["library/a.py:2 imports train_x"]
    assert logs_imports_of_training() == ["library/logs.py:1 imports library.training.accel",
                                          "library/logs.py:1 imports library.training.accel.reduce_sum"]
    assert cycles(package_edges()) == [["library.training", "networks"]]

"""The library's import graph: layers, no upward import, no cycle (lazy imports inside functions count too).

A module may import modules of its own layer or of lower layers; within a layer the imports form no
cycle. To add a module, put it in LAYERS: the lowest layer whose modules give it all it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dreambooth_lib"

# Bottom to top. A module named by its path under dreambooth_lib/ without .py; a folder = every module in it.
LAYERS = [
    ("foundation", ["errors", "config", "fsio", "loss", "memory", "tiny", "metrics"]),
    ("families and processes", ["families", "distributed"]),
    ("data and files", ["data", "class_images", "subjects", "validate", "weights", "checkpoint", "disk", "sample"]),
    ("training pieces", ["models", "step", "compiled"]),
    ("the loop", ["train"]),
    ("entry points", ["__main__", "__init__", "export", "evaluate", "toyworld"]),
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def layer_of(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if module in names or module.split(".")[0] in names:
            return i
    raise AssertionError(f"dreambooth_lib/{module.replace('.', '/')}.py is in no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path) -> set[str]:
    """The dreambooth_lib modules `path` imports anywhere in it (top level or inside functions)."""
    me = module_name(path).split(".")
    package = me[:-1] if path.name != "__init__.py" else me[:-1]  # __init__'s package is its folder
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("dreambooth_lib.") for a in node.names if a.name.startswith("dreambooth_lib.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("dreambooth_lib"):
                target = node.module.removeprefix("dreambooth_lib").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import data` imports the module data; `from .data import x` data
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").is_file()
                          or (PACKAGE / sub.replace(".", "/")).is_dir() else target)
    return {m.removesuffix(".__init__") for m in found if m} - {module_name(path).removesuffix(".__init__")}


def graph() -> dict[str, set[str]]:
    return {module_name(p).removesuffix(".__init__") or "__init__": imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
            for a, targets in sorted(edges.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    edges = graph()
    assert {"train", "step", "checkpoint", "families", "families.sd"} <= set(edges)  # the walk found the package
    upward = upward_imports(edges)
    assert not upward, "lower layers must not import higher ones:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # A lazy import inside a function counts: data importing train (a higher layer) is reported.
    fake = tmp_path / "dreambooth_lib"
    (fake / "families").mkdir(parents=True)
    (fake / "data.py").write_text("def f():\n    from .train import train\n")
    (fake / "train.py").write_text("from . import data\nfrom .families import base\n")
    (fake / "families" / "__init__.py").write_text("from .base import x\nfrom ..errors import E\n")
    (fake / "families" / "base.py").write_text("")
    (fake / "errors.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    edges = graph()
    assert edges["data"] == {"train"} and edges["train"] == {"data", "families.base"}
    assert edges["families"] == {"families.base", "errors"}
    assert find_cycle(edges) == ["data", "train", "data"]
    assert upward_imports(edges) == ["data (data and files) imports train (the loop)"]

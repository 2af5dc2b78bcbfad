"""Import layering of the ``monai_ext`` package: no module imports from a higher layer, and no import circles.

The layers, lowest first (the README's Layout section describes the same order). A module belongs to the layer
of its first name under ``monai_ext`` (``monai_ext.data.oasis`` -> ``data``, ``monai_ext.cli`` -> ``cli``); it may
import modules of its own layer and of lower layers only. Every import counts: module level, inside functions
(deferred imports), under ``TYPE_CHECKING``, relative ones, and ``importlib.import_module("monai_ext...")`` /
``__import__`` with a literal name. Two modules importing each other, directly or through others, are a circle
even within one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_ext"

LAYERS: list[set[str]] = [
    # errors: the bad-input exceptions; spatial: coordinates, sampling, B-splines, inversion, affine fits, TPS
    {"errors", "spatial"},
    {"metrics", "networks", "data"},
    {"losses", "checkpoints", "export", "tracking"},
    {"engines"},
    {"io", "label_app"},
    {"demo", "cli", "__main__"},  # front ends; __main__ joins the commands of cli and demo
]
ROOT = ""  # the package's own __init__ (only ``__version__``) sits below every layer
LEVEL = {name: rank for rank, names in enumerate(LAYERS) for name in names} | {ROOT: -1}


def _module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package's name for its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_names()


def _resolve(name: str) -> str | None:
    """The package module that importing ``name`` loads last (``monai_ext.a.b.func`` -> ``monai_ext.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imports_of(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.append(source)
            names += [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    found = {_resolve(n) for n in names if n == "monai_ext" or n.startswith("monai_ext.")}
    return {m for m in found if m is not None and m != module}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) not in LEVEL)
    assert not unplaced, f"modules of no layer (add them to LAYERS in tests/test_layers.py): {unplaced}"


def test_no_import_from_a_higher_layer():
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if LEVEL.get(layer_of(target), -1) > LEVEL.get(layer_of(module), -1)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (each one holds an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_circles():
    circles = strongly_connected(GRAPH)
    assert not circles, "modules importing each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_circle_finder(graph, expected):
    assert strongly_connected(graph) == expected


def test_import_parser_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    source = (
        "from . import sampling\n"
        "from ..data.base import pair_item\n"
        "def later():\n"
        "    import monai_ext.cli\n"
        "    importlib.import_module('monai_ext.demo')\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, "monai_ext.spatial.probe", path)
    assert imports_of("monai_ext.spatial.probe") == {
        "monai_ext.spatial",  # ``from . import sampling`` runs the package's __init__ first
        "monai_ext.spatial.sampling",
        "monai_ext.data.base",
        "monai_ext.cli",
        "monai_ext.demo",
    }

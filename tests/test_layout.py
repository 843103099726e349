"""The house rules of the tree, checked on the source: the device and the edge meet only on the wire
(neither imports the other), no import cycle between our modules, and no function over 60 lines in
the two runtimes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"covspec": "covspec", "export": "covspec.export", "device_runtime": "covspec.device_runtime",
            "edge_runtime": "covspec.edge_runtime", "transport": "covspec.transport",
            "calibration": "covspec.calibration"}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Every module of ours by its import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ours that `path` imports at run time, at any depth (module level or inside
    functions; not under `if TYPE_CHECKING:`, which only type checkers read)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) - {name} for name, path in mods.items()}


def test_the_runtimes_meet_only_on_the_wire() -> None:
    crossing = [(a, b) for a, deps in graph().items() for b in deps
                if (a.startswith("covspec.device_runtime") and b.startswith("covspec.edge_runtime"))
                or (a.startswith("covspec.edge_runtime") and b.startswith("covspec.device_runtime"))]
    assert not crossing, f"the device and the edge import each other: {crossing}"


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of the directed graph, as the list of its nodes (first repeated last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [])):
            return found
    return []


def test_no_import_cycle() -> None:
    # a package's __init__ importing its own submodules (or they it) is not a cycle of design
    edges = {a: {b for b in deps if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, deps in graph().items()}
    cycle = find_cycle(edges)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_long_functions_in_the_runtimes() -> None:
    long = []
    for folder in ("device_runtime", "edge_runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_the_checks_can_fail() -> None:
    """The graph sees relative imports and imports inside functions; the cycle finder finds cycles."""
    g = graph()
    assert "covspec.transport.protocol" in g["covspec.transport.channel"]  # `from .protocol import ...`
    assert "covspec.transport.channel" in g["covspec.tools.procs"]  # imported inside wait_for_edge
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []

"""The house rules of the tree, checked on the source: the device and the edge meet only on the wire
(neither imports the other), no import cycle between our modules (nor one that imports under
`TYPE_CHECKING` close), no library module importing the CLI, and no function over 60 lines in the
two runtimes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"covspec": "covspec", "export": "covspec.export", "device_runtime": "covspec.device_runtime",
            "edge_runtime": "covspec.edge_runtime", "transport": "covspec.transport",
            "calibration": "covspec.calibration", "benchmarks": "benchmarks"}
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


def imports(path: Path, name: str, known: set[str], typing: bool = False) -> set[str]:
    """The modules of ours that `path` imports at run time, at any depth (module level or inside
    functions; not under `if TYPE_CHECKING:`, which only type checkers read, unless `typing`)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing:
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


def graph(typing: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods), typing) - {name} for name, path in mods.items()}


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


def design_edges(g: dict[str, set[str]]) -> dict[str, set[str]]:
    # a package's __init__ importing its own submodules (or they it) is not a cycle of design
    return {a: {b for b in deps if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, deps in g.items()}


def test_no_import_cycle() -> None:
    cycle = find_cycle(design_edges(graph()))
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_import_cycle_under_type_checking() -> None:
    """An import under `TYPE_CHECKING` hides a cycle from the interpreter, not from the reader: the
    modules still need each other (the edge's handlers take a Protocol of the server, not the server)."""
    cycle = find_cycle(design_edges(graph(typing=True)))
    assert not cycle, f"import cycle through TYPE_CHECKING: {' -> '.join(cycle)}"


# a module's own command-line entry point (`python -m ...`: main) and the handlers the one CLI parser calls
# back (covspec/cli's TOOLS: add_arguments, run) are the CLI's, wherever they live
CLI_FUNCTIONS = {"main", "add_arguments", "run"}


def cli_imports(path: Path) -> list[str]:
    """Where `path` imports covspec.cli outside CLI_FUNCTIONS: "line N in FUNCTION" (or "module level")."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name if function is None else function  # the outermost function decides
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "covspec.cli" or n.startswith("covspec.cli.") for n in names) and function not in CLI_FUNCTIONS:
            found.append(f"line {node.lineno} in {function or 'module level'}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text()), None)
    return found


def test_nothing_installed_imports_the_studies() -> None:
    """benchmarks/ is not installed: no module of the package may need it."""
    needing = {a: sorted(b for b in deps if b.startswith("benchmarks"))
               for a, deps in graph(typing=True).items() if not a.startswith("benchmarks")}
    assert not any(needing.values()), {a: b for a, b in needing.items() if b}


def test_no_library_module_imports_the_cli() -> None:
    """The CLI derives from the library (its configuration objects), never the other way round."""
    offenders = {name: where for name, path in modules().items()
                 if not (name == "covspec.cli" or name.startswith("covspec.cli.")) and (where := cli_imports(path))}
    assert not offenders, f"library modules importing covspec.cli: {offenders}"


# edited in parallel by issue 28's session (device_runtime/flash.py, runtime_payload.py): derived at the merge
BARE_EXCEPTIONS: set[str] = set()


def test_errors_derive_from_covspec_error() -> None:
    """Every exception class of ours derives from CovspecError (the CLI prints those as one line)."""
    bare = [f"{name}.{node.name}" for name, path in modules().items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.name != "CovspecError"
            and any(isinstance(b, ast.Name) and b.id in ("Exception", "BaseException") for b in node.bases)]
    assert set(bare) <= BARE_EXCEPTIONS, f"exceptions not under covspec.errors.CovspecError: {sorted(set(bare) - BARE_EXCEPTIONS)}"


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


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The graph sees relative imports and imports inside functions; the cycle finder finds cycles."""
    g = graph()
    assert "covspec.transport.protocol" in g["covspec.transport.channel"]  # `from .protocol import ...`
    assert "covspec.transport.channel" in g["covspec.tools.procs"]  # imported inside wait_for_edge
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    typed = graph(typing=True)
    assert "covspec.calibration.profile" in typed["covspec.api"] and "covspec.calibration.profile" not in g["covspec.api"]
    sample = tmp_path / "sample.py"
    sample.write_text("def bench():\n    from covspec.cli import build_parser\n    return build_parser\n")
    assert any("in bench" in where for where in cli_imports(sample))  # an import inside a function is seen

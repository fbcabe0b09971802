"""The package's import graph: no cycles, and the lower layers never import the commands.

Read from the source with `ast`, every `import` and `from ... import` counted, those inside functions too (a
function-level import still ties the two modules together; it only defers the tie). Only imports for type
checkers (`if TYPE_CHECKING:`), which never run, are left out.
"""

import ast
import functools
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "vitfood"
COMMANDS = {"vitfood.cli"}  # the command lines: nothing below them may import them


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # read once for the three tests
def import_graph() -> dict[str, set[str]]:
    """{module: the vitfood modules it imports}. `from vitfood.x import y` imports vitfood.x.y when that is a
    module, else vitfood.x; a package's __init__ that runs on the way is not counted (vitfood's loads nothing)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: a depth-first search that meets a module still on its path."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"vitfood.cli", "vitfood.hub", "vitfood.prepare", "vitfood.train_loop"} <= set(graph)
    # Spot checks that the reader sees what is there, function-level imports included.
    assert "vitfood.prepare" in graph["vitfood.cli"]  # prepare_command(): `from vitfood.prepare import main`
    assert "vitfood.errors" in graph["vitfood.hub"]
    # processor_config names Preprocessing for type checkers only; preprocess imports it for real.
    assert "vitfood.processor_config" in graph["vitfood.preprocess"]
    assert "vitfood.preprocess" not in graph["vitfood.processor_config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_only_the_commands_import_the_commands():
    graph = import_graph()
    for name, targets in graph.items():
        if name not in COMMANDS:
            assert not targets & COMMANDS, f"{name} imports {sorted(targets & COMMANDS)}"
    # The Hub module is a lower layer: it reaches neither the commands nor prepare.py, which uses it.
    assert not graph["vitfood.hub"] & {"vitfood.cli", "vitfood.prepare"}

"""How the package is put together, checked: every SQL statement lives in gatewayd/store/, whose modules each own
their tables (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gatewayd"
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|REPLACE)\b", re.IGNORECASE)


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_every_sql_statement_lives_in_the_store_package() -> None:
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "store" in path.parents:
            continue
        for line, text in _strings(ast.parse(path.read_text(encoding="utf-8"))):
            if SQL.match(text) and re.search(r"\b(FROM|INTO|TABLE|SET|VALUES|\d)\b", text, re.IGNORECASE):
                outside.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text[:60]!r}")
    assert outside == [], "SQL outside gatewayd/store/:\n" + "\n".join(outside)


def test_the_check_finds_sql_where_it_is() -> None:
    found = [t for _, t in _strings(ast.parse((PACKAGE / "store" / "interpret.py").read_text(encoding="utf-8")))]
    assert any(SQL.match(t) for t in found)


# --- imports -------------------------------------------------------------------------------------------------------


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of gatewayd and the gatewayd modules it imports, at any level (under TYPE_CHECKING and inside
    functions too: a cycle hidden there is still two modules that each need the other)."""
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules, if there is any (packages' __init__ re-exports are not cycles of their
    own: a package importing its submodule is how it exports)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a module importing its own package: the package's __init__
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_two_modules_import_each_other_even_for_types_only() -> None:
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# --- wiring ----------------------------------------------------------------------------------------------------


def _assigned_attributes(tree: ast.AST) -> list[tuple[int, str]]:
    """Every ``x.y = ...`` whose ``x`` is not ``self``: a component filled in by assignment after it was built."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and not (isinstance(t.value, ast.Name) and t.value.id == "self"):
                    found.append((t.lineno, ast.unparse(t)))
    return found


def test_the_supervisor_builds_components_through_their_constructors_and_assigns_into_none() -> None:
    tree = ast.parse((PACKAGE / "app" / "supervisor.py").read_text(encoding="utf-8"))
    assert _assigned_attributes(tree) == []


def test_the_wiring_check_finds_an_assignment_into_a_component() -> None:
    tree = ast.parse("def run(self, d, s):\n    self.x = 1\n    d.clock_synced = s\n    self.a.b = 2\n")
    assert _assigned_attributes(tree) == [(3, "d.clock_synced"), (4, "self.a.b")]

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

"""Declared dependencies: each one used, and the internals we rely on still where we read them."""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from packaging.requirements import Requirement
from packaging.version import Version

from orchestrator.server.store.direct import Direct

ROOT = Path(__file__).resolve().parent.parent
# distribution -> (its pyproject, the sources it ships)
DISTRIBUTIONS = {
    "orchestrator-rpc-server": (ROOT / "pyproject.toml", ROOT / "server"),
    "orchestrator-rpc-client": (ROOT / "clients" / "pyproject.toml", ROOT / "clients"),
    "orchestrator-rpc-stubs": (ROOT / "generated" / "pyproject.toml", ROOT / "generated"),
}
# Used without an import of their own: SQLAlchemy loads the drivers a URL names.
USED_BY_NAME = {
    "aiosqlite": "sqlite+aiosqlite:// URLs",
    "asyncpg": "postgresql+asyncpg:// URLs",
    "tzdata": "zoneinfo's fallback where the system has no zone data",
}


def requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def imported(sources: Path) -> set[str]:
    """Top-level modules imported anywhere under `sources`."""
    names: set[str] = set()
    for path in sources.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def provides(distribution: str) -> set[str]:
    """The modules a distribution installs (top-level and, for namespaces, one level down)."""
    files = importlib.metadata.distribution(distribution).files or []
    modules = set()
    for f in files:
        parts = Path(str(f)).with_suffix("").parts
        if not parts or parts[0].endswith((".dist-info", ".pth")) or ".." in parts:
            continue
        modules.add(".".join(p for p in parts if p != "__init__"))
    return modules


def test_every_declared_dependency_is_imported() -> None:
    for name, (pyproject, sources) in DISTRIBUTIONS.items():
        used = imported(sources)
        for req in requirements(pyproject):
            if req.name in USED_BY_NAME or req.name.startswith("orchestrator-rpc-"):
                continue
            modules = provides(req.name)
            hit = any(u == m or u.startswith(m + ".") for u in used for m in modules)
            assert hit, f"{name} declares {req.name} but imports none of its modules"


def test_sqlalchemy_is_bounded_where_we_read_its_internals() -> None:
    (req,) = [r for r in requirements(ROOT / "pyproject.toml") if r.name == "sqlalchemy"]
    assert any(spec.operator == "<" for spec in req.specifier), "store/direct.py needs a bound"
    assert Version(sa.__version__) in req.specifier


def test_the_compiled_statement_internals_direct_reads_are_there() -> None:
    """store/direct.py runs SQLAlchemy's own compiled SQL with its own type processors. If a
    SQLAlchemy release moves these, this fails and names what moved."""
    from sqlalchemy.dialects import sqlite

    table = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime),
        sa.Column("status", sa.String),
    )
    statement = sa.select(table.c.id, table.c.at).where(
        table.c.status == "PENDING", table.c.id == sa.bindparam("id")
    )
    compiled: Any = statement.compile(dialect=sqlite.dialect(), column_keys=["id"])
    assert isinstance(compiled._bind_processors, dict)
    positions = list(compiled.positiontup or ())
    assert "id" in positions
    literal = next(n for n in positions if n != "id")
    assert compiled.binds[literal].effective_value == "PENDING"
    columns = compiled._result_columns
    assert [c.keyname for c in columns] == ["id", "at"]
    processor = columns[1].type._cached_result_processor(sqlite.dialect(), None)
    assert callable(processor) and processor("2026-01-02 03:04:05.000000").year == 2026
    # And Direct itself, on a real SQLite connection.
    import sqlite3

    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, at DATETIME, status VARCHAR)")
    connection.execute("INSERT INTO t VALUES (1, '2026-01-02 03:04:05.000000', 'PENDING')")
    direct = Direct(sqlite.dialect())
    rows = direct.execute(connection, statement, {"id": 1}).all()
    assert [(r["id"], r["at"].year) for r in rows] == [(1, 2026)]

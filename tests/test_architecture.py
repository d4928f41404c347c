"""The invariants docs/ARCHITECTURE.md promises, checked on the source itself."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server" / "orchestrator" / "server"
# Database drivers and SQL toolkits: only store/ speaks to the database.
DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aiosqlite", "sqlite3", "alembic", "psycopg")
# The store's tables and statements: whoever imports these builds SQL.
SQL_MODULES = (
    "orchestrator.server.store.schema",
    "orchestrator.server.store.statements",
    "orchestrator.server.store.direct",
    "orchestrator.server.store.dialect",
)
# Only the edge speaks gRPC: the servicer, the interceptors and the server factory.
# api/connect.py speaks gRPC to the interceptors (their context and status codes).
GRPC_EDGE = {"api/interceptors.py", "api/servicer.py", "api/connect.py", "app.py"}


def modules() -> Iterator[tuple[str, set[str]]]:
    """(path under server/, every module it imports) for each server module."""
    for path in sorted(SERVER.rglob("*.py")):
        relative = path.relative_to(SERVER).as_posix()
        if relative.startswith("store/migrations/"):
            continue  # Alembic's own files, inside store/ anyway
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        yield relative, imported


def offending(imported: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported if any(m == p or m.startswith(f"{p}.") for p in prefixes))


def test_the_scan_sees_the_store() -> None:
    """The checks below are only as good as the scan: it must find what store/ imports."""
    found = dict(modules())
    assert offending(found["store/runs.py"], DATABASE_MODULES)
    assert offending(found["store/runs.py"], SQL_MODULES)
    assert offending(found["app.py"], ("grpc",))


@pytest.mark.parametrize("relative,imported", list(modules()))
def test_only_the_store_speaks_sql(relative: str, imported: set[str]) -> None:
    if relative.startswith("store/"):
        return
    assert not offending(imported, DATABASE_MODULES), f"{relative} imports a database module"
    assert not offending(imported, SQL_MODULES), f"{relative} builds SQL from the store's tables"


@pytest.mark.parametrize("relative,imported", list(modules()))
def test_only_the_edge_speaks_grpc(relative: str, imported: set[str]) -> None:
    if relative in GRPC_EDGE:
        return
    assert not offending(imported, ("grpc", "grpc_health", "grpc_reflection", "grpc_status")), (
        f"{relative} imports grpc: domain code raises domain errors, the edge translates"
    )

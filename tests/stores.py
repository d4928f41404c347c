"""Test stores: a fresh SQLite file, or a fresh PostgreSQL database cloned from a migrated
template (CREATE DATABASE ... TEMPLATE is much faster than migrating each time)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa

from orchestrator.server.store.cluster import asyncpg_dsn
from orchestrator.server.store.database import Database

T = TypeVar("T")

POSTGRES_URL = os.environ.get(
    "ORCHESTRATOR_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
_template: str | None = None
_lock = threading.Lock()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a private loop in a thread (fixtures may run while a test
    loop exists in this thread)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _url(name: str) -> sa.URL:
    return sa.make_url(POSTGRES_URL).set(database=name)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(sa.make_url(POSTGRES_URL)))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _make_template(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(f'CREATE DATABASE "{name}"')
    db = Database(_url(name).render_as_string(hide_password=False))
    await db.migrate()
    await db.close()


def postgres_database() -> str:
    """A new, migrated, empty database; returns its SQLAlchemy URL."""
    global _template
    with _lock:
        if _template is None:
            name = f"orch_template_{os.getpid()}"
            _run(_make_template(name))
            _template = name
    name = f"orch_test_{uuid.uuid4().hex[:16]}"
    _run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{_template}"'))
    return _url(name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = sa.make_url(url).database
    _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def drop_template() -> None:
    global _template
    if _template is not None:
        _run(_admin(f'DROP DATABASE IF EXISTS "{_template}" WITH (FORCE)'))
        _template = None


def fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of a query against a test store (SQLite or PostgreSQL), as dicts."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        import sqlite3

        with sqlite3.connect(parsed.database or "") as conn:
            conn.row_factory = sqlite3.Row
            sqlite_sql = sql
            for i in range(len(args), 0, -1):
                sqlite_sql = sqlite_sql.replace(f"${i}", "?")
            return [dict(r) for r in conn.execute(sqlite_sql, args).fetchall()]

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(asyncpg_dsn(parsed))
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return _run(go())


def execute_postgres(url: str, script: str) -> None:
    """Run an SQL script (several statements, no parameters) against a PostgreSQL test store."""

    async def go() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(sa.make_url(url)))
        try:
            await conn.execute(script)
        finally:
            await conn.close()

    _run(go())

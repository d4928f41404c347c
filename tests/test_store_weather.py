"""The one classification of store errors (store/outage.py), fed real driver errors, and the
health it feeds."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa

from orchestrator.server.errors import StoreUnavailable
from orchestrator.server.store.cluster import asyncpg_dsn
from orchestrator.server.store.database import Database
from orchestrator.server.store.outage import StoreHealth, Weather, classify
from tests.process import free_port
from tests.stores import POSTGRES_URL


def raised(conn: sqlite3.Connection, sql: str) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as caught:
        conn.execute(sql)
    return caught.value


def test_sqlite_lock_is_contention_and_bad_sql_is_a_bug(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    assert classify(raised(other, "BEGIN IMMEDIATE")) is Weather.CONTENTION
    holder.execute("ROLLBACK")
    assert classify(raised(other, "SELECT * FROM missing")) is None
    other.execute("INSERT INTO t VALUES (1)")
    assert classify(raised(other, "INSERT INTO t VALUES (1)")) is None  # a constraint


def test_sqlite_full_is_full(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    conn.execute("CREATE TABLE t (x BLOB)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    assert classify(raised(conn, "INSERT INTO t VALUES (zeroblob(100000))")) is Weather.FULL


async def test_an_unreachable_server_is_store_unavailable() -> None:
    url = sa.make_url(POSTGRES_URL).set(port=free_port())  # nothing listens there
    db = Database(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await db.probe()
        assert classify(caught.value.__cause__ or caught.value) is Weather.UNREACHABLE
        assert not db.health.reachable
    finally:
        await db.close()


@pytest.mark.postgres
async def test_postgres_terminated_connection_is_unreachable_and_errors_stay_bugs() -> None:
    dsn = asyncpg_dsn(sa.make_url(POSTGRES_URL))
    victim = await asyncpg.connect(dsn)
    killer = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as bug:
            await victim.execute("SELECT * FROM no_such_table_here")
        assert classify(bug.value) is None
        pid = await victim.fetchval("SELECT pg_backend_pid()")
        closed = asyncio.Event()
        victim.add_termination_listener(lambda _conn: closed.set())
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.wait_for(closed.wait(), 10)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as gone:
            await victim.execute("SELECT 1")
        assert classify(gone.value) is Weather.UNREACHABLE
    finally:
        await killer.close()
        victim.terminate()


async def test_an_answer_sent_before_an_outage_does_not_end_it() -> None:
    """A commit whose answer was on the wire when the connection went is not the store's
    return: only a call begun after the outage was noticed is."""
    health = StoreHealth()
    before = time.monotonic()
    health.failed(Weather.UNREACHABLE, ConnectionResetError("cut"))
    assert not health.reachable
    health.succeeded(wrote=True, began=before)
    assert not health.reachable
    health.succeeded(wrote=True, began=time.monotonic())
    assert health.reachable

"""The store's database: engines (made by its dialect), reads, the probe, migrations."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.server.store.dialect import READERS, dialect_for
from orchestrator.server.store.direct import SyncConnection, drive
from orchestrator.server.store.outage import StoreHealth, classify, outage_of
from orchestrator.server.store.schema import server_settings

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
# The health probe: one cheap read that touches the database file or server.
PROBE = sa.select(server_settings.c.name).limit(1)


class Database:
    """The store's engines. SQLite gets a single writer connection (WAL lets readers run beside
    it); PostgreSQL shares one pool."""

    def __init__(self, url: str, stall_seconds: float = 0.0, client_name: str = "") -> None:
        self.url = sa.make_url(url)
        self.dialect = dialect_for(self.url)
        # A writer transaction idle this long belongs to a stopped process (SIGSTOP, a frozen
        # VM): the database ends it, so its row locks do not hide its runs from claims.
        engines = self.dialect.engines(self.url, stall_seconds, client_name)
        self.writer: AsyncEngine = engines.writer
        self.reader: AsyncEngine = engines.reader
        self.sync_writer = engines.sync_writer
        self.sync_reader = engines.sync_reader
        self.direct = engines.direct
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="store-reader")
        # Whether the store can be reached now, learnt from every call and a probe.
        self.health = StoreHealth(self.probe)

    async def read(self, unit: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run `unit(conn)` in one read transaction (one snapshot), driven as the writer drives
        its units: a read may await the store and nothing else. On SQLite it runs in one hop
        to a reader thread on the stdlib driver, however many statements it makes (through
        aiosqlite each would be a hop of its own); on PostgreSQL, in one greenlet on the pool.
        A store that cannot answer raises StoreUnavailable (see store/outage.py)."""
        began = time.monotonic()
        try:
            result = await self._read(unit)
        except Exception as exc:
            weather = classify(exc)
            if weather is None:
                raise
            self.health.failed(weather, exc)
            outage = outage_of(exc)
            assert outage is not None
            raise outage from exc
        self.health.succeeded(began=began)
        return result

    async def _read(self, unit: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        if self.sync_reader is None:
            async with self.reader.connect() as conn, conn.begin():
                # Reads stay on SQLAlchemy's path. On the driver path, reads now and then did
                # not see a run committed just before (WatchExecution NOT_FOUND right after
                # Execute: 2 of 8 README walkthroughs on PostgreSQL; 0 of 8 on this path),
                # most likely the driver path's transaction under the readers' REPEATABLE
                # READ. The writer keeps the driver path.
                return await conn.run_sync(lambda sync: drive(unit(SyncConnection(sync))))
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, context.run, self._read_in_thread, unit
        )

    async def probe(self) -> None:
        """One cheap read: raises when the store cannot be reached."""

        async def unit(conn: SyncConnection) -> None:
            await conn.execute(PROBE)

        await self.read(unit)

    def _read_in_thread(self, unit: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        assert self.sync_reader is not None and self.direct is not None
        with self.sync_reader.begin() as conn:
            return drive(unit(SyncConnection(conn, self.direct)))

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        async with self.writer.connect() as conn:
            await self.dialect.lock_migrations(conn)
            try:
                await conn.run_sync(_upgrade)
                await conn.commit()
            finally:
                await self.dialect.unlock_migrations(conn)

    async def close(self) -> None:
        await self.writer.dispose()
        await self.reader.dispose()
        self._readers.shutdown()
        if self.sync_reader is not None:
            self.sync_reader.dispose()


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config for our migrations, optionally bound to an open connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: sa.Connection) -> None:
    command.upgrade(alembic_config(connection), "head")

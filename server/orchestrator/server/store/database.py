"""Engines for the store: one for the writer task, one for readers; migrations at open."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.server.store.direct import Direct, SyncConnection, drive
from orchestrator.server.store.outage import StoreHealth, classify, outage_of
from orchestrator.server.store.schema import server_settings

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
READERS = 4  # reader threads (and SQLite connections) on SQLite
MIGRATION_LOCK = 0x6F726369
# A connection attempt that gets no answer (a black-holed network) gives up after this long,
# so an outage is noticed as one rather than as a hang.
CONNECT_TIMEOUT = 5
# The health probe: one cheap read that touches the database file or server.
PROBE = sa.select(server_settings.c.name).limit(1)


def _sqlite_pragmas(engine: sa.Engine, begin: str) -> None:
    # pysqlite's own transaction handling gets in the way of SAVEPOINT and of BEGIN IMMEDIATE;
    # the SQLAlchemy-documented fix is to turn it off and emit BEGIN ourselves.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only power loss can cost the
        # last commits. That is the durability every peer on SQLite offers.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class Database:
    """The store's engines. SQLite gets a single writer connection (WAL lets readers run beside
    it); PostgreSQL shares one pool."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        self.dialect = self.url.get_backend_name()
        if self.is_sqlite:
            self.writer: AsyncEngine = create_async_engine(self.url, pool_size=1, max_overflow=0)
            _sqlite_pragmas(self.writer.sync_engine, "BEGIN IMMEDIATE")
            self.reader: AsyncEngine = create_async_engine(self.url, pool_size=8, max_overflow=8)
            _sqlite_pragmas(self.reader.sync_engine, "BEGIN")
            # The writer's batches run on the stdlib driver in one thread (store/writer.py).
            self.sync_writer: sa.Engine | None = sa.create_engine(
                self.url.set(drivername="sqlite"), pool_size=1, max_overflow=0
            )
            _sqlite_pragmas(self.sync_writer, "BEGIN IMMEDIATE")
            # Reads too: each in one hop to a reader thread (see `read`).
            self.sync_reader: sa.Engine | None = sa.create_engine(
                self.url.set(drivername="sqlite"), pool_size=READERS, max_overflow=0
            )
            _sqlite_pragmas(self.sync_reader, "BEGIN")
            self.direct: Direct | None = Direct(self.sync_reader.dialect)
            self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="store-reader")
        else:
            self.sync_writer = None
            self.sync_reader = None
            self.direct = None
            self.writer = create_async_engine(
                self.url,
                pool_size=4,
                max_overflow=4,
                pool_pre_ping=True,
                connect_args={"timeout": CONNECT_TIMEOUT},
            )
            # A read is several statements (a run, its steps, its clarifications): at READ
            # COMMITTED each would see its own snapshot, and a commit landing between them
            # showed a clarification pending beside its step still PENDING. Readers only
            # read, so REPEATABLE READ costs them no serialization failures.
            self.reader = create_async_engine(
                self.url,
                pool_size=8,
                max_overflow=8,
                pool_pre_ping=True,
                isolation_level="REPEATABLE READ",
                connect_args={"timeout": CONNECT_TIMEOUT},
            )
        # Whether the store can be reached now, learnt from every call and a probe.
        self.health = StoreHealth(self.probe)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    async def read(self, unit: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run `unit(conn)` in one read transaction (one snapshot), driven as the writer drives
        its units: a read may await the store and nothing else. On SQLite it runs in one hop
        to a reader thread on the stdlib driver, however many statements it makes (through
        aiosqlite each would be a hop of its own); on PostgreSQL, in one greenlet on the pool.
        A store that cannot answer raises StoreUnavailable (see store/outage.py)."""
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
        self.health.succeeded()
        return result

    async def _read(self, unit: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        if self.sync_reader is None:
            async with self.reader.connect() as conn, conn.begin():
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
            if not self.is_sqlite:
                # Replicas starting together must not migrate at the same time.
                await conn.execute(sa.text(f"SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                await conn.commit()
            try:
                await conn.run_sync(_upgrade)
                await conn.commit()
            finally:
                if not self.is_sqlite:
                    await conn.execute(sa.text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                    await conn.commit()

    async def close(self) -> None:
        await self.writer.dispose()
        await self.reader.dispose()
        if self.sync_reader is not None:
            self._readers.shutdown()
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

"""Engines for the store: one for the writer task, one for readers; migrations at open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x6F726369


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
        else:
            self.sync_writer = None
            self.writer = create_async_engine(
                self.url, pool_size=4, max_overflow=4, pool_pre_ping=True
            )
            self.reader = create_async_engine(
                self.url, pool_size=8, max_overflow=8, pool_pre_ping=True
            )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

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


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config for our migrations, optionally bound to an open connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: sa.Connection) -> None:
    command.upgrade(alembic_config(connection), "head")

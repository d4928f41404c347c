"""What differs between the store's two databases, as one small class each (the shape of
dbos-transact-py's `_sys_db_sqlite.py` / `_sys_db_postgres.py`): how the engines are made,
how rows are locked, how replicas hear of each other. Nothing else in the server asks which
database it runs on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from orchestrator.server.store.asyncpg_path import AsyncpgPath
from orchestrator.server.store.cluster import CHANNEL, ClusterBus, Handler
from orchestrator.server.store.direct import Direct
from orchestrator.server.store.statements import (
    LOCK_EVENT_ORDER,
    SELECT_RUN,
    SELECT_RUN_LOCKED,
    SELECT_TENANT_RUN,
    SELECT_TENANT_RUN_LOCKED,
)

READERS = 4  # reader threads (and SQLite connections) on SQLite
MIGRATION_LOCK = 0x6F726369
# A connection attempt that gets no answer (a black-holed network) gives up after this long,
# so an outage is noticed as one rather than as a hang.
CONNECT_TIMEOUT = 5


def dumps(value: Any) -> str:
    """JSON columns' encoder: orjson, which is 5-10x faster than the stdlib's and, like it,
    holds the interpreter while it runs (a multi-MB value held the event loop for tens of ms).
    Values orjson refuses (integers beyond 64 bits, non-string keys) go through the stdlib."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def loads(value: Any) -> Any:
    """JSON columns' decoder. A JSON column has NUMERIC affinity on SQLite, so a bare number
    (a signal's payload, a step's output) comes back as the number, not as its text."""
    if isinstance(value, int | float):
        return value
    return orjson.loads(value)


# Every engine of the store encodes and decodes JSON columns with these.
JSON_CODEC: dict[str, Any] = {"json_serializer": dumps, "json_deserializer": loads}


@dataclass
class Engines:
    """The store's connections: the writer's, the readers', and (SQLite) the stdlib-driver
    engines that batches and reads run on in one thread hop each."""

    writer: AsyncEngine
    reader: AsyncEngine
    sync_writer: sa.Engine | None = None
    sync_reader: sa.Engine | None = None
    direct: Direct | None = None


class Dialect:
    """The base: what a database without row locks or notifications does."""

    name: ClassVar[str]
    # One replica on its own store: it takes every unfinished run at start.
    single_replica: ClassVar[bool] = True
    # The NOTIFY channel commits are announced on ("" = none).
    notify_channel: ClassVar[str] = ""
    # A run row read by a unit that will write it (locked where the database locks rows).
    select_run_for_write: ClassVar[sa.Select[Any]] = SELECT_RUN
    select_tenant_run_for_write: ClassVar[sa.Select[Any]] = SELECT_TENANT_RUN
    # A run's compare-and-set and its step's update go in one statement (a data-modifying
    # CTE): one round trip instead of two.
    updates_run_with_step: ClassVar[bool] = False
    # Group commits keep their units' writes and run them together (SyncConnection.write):
    # where a statement is a round trip, and a compare-and-set can fail inside a statement.
    defers_writes: ClassVar[bool] = False

    def engines(self, url: sa.URL, stall_seconds: float = 0.0, client_name: str = "") -> Engines:
        """The engines; a write transaction left idle `stall_seconds` is ended (0: never);
        `client_name` names the connections to the server (where it has names for them)."""
        raise NotImplementedError

    def insert(self, table: sa.Table) -> Any:
        """An INSERT that takes ON CONFLICT clauses (both databases spell them alike)."""
        return sqlite.insert(table)

    def claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """`query` for unowned runs, made safe for replicas claiming at the same time."""
        return query

    def order_events(self, stage: Callable[[Any], None]) -> None:
        """Stage what makes event ids grow in commit order (given the Tx's `stage`)."""

    async def lock_key(self, conn: Any, name: str) -> None:
        """Hold `name` until the transaction ends, against other replicas' transactions (a
        single writer needs nothing: its transactions never overlap)."""

    async def lock_migrations(self, conn: AsyncConnection) -> None:
        """Keep replicas starting together from migrating at the same time."""

    async def unlock_migrations(self, conn: AsyncConnection) -> None:
        pass

    def cluster_bus(self, url: sa.URL, origin: str, handler: Handler) -> ClusterBus | None:
        """How this replica hears the others' commits (None: it is the only one)."""
        return None


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


class SqliteDialect(Dialect):
    """The embedded store: one replica, one writer connection (WAL lets readers run beside
    it), batches and reads on the stdlib driver."""

    name = "sqlite"

    def engines(self, url: sa.URL, stall_seconds: float = 0.0, client_name: str = "") -> Engines:
        writer = create_async_engine(url, pool_size=1, max_overflow=0, **JSON_CODEC)
        _sqlite_pragmas(writer.sync_engine, "BEGIN IMMEDIATE")
        reader = create_async_engine(url, pool_size=8, max_overflow=8, **JSON_CODEC)
        _sqlite_pragmas(reader.sync_engine, "BEGIN")
        # The writer's batches run on the stdlib driver in one thread (store/writer.py).
        sync_writer = sa.create_engine(
            url.set(drivername="sqlite"), pool_size=1, max_overflow=0, **JSON_CODEC
        )
        _sqlite_pragmas(sync_writer, "BEGIN IMMEDIATE")
        # Reads too: each in one hop to a reader thread (see Database.read).
        sync_reader = sa.create_engine(
            url.set(drivername="sqlite"), pool_size=READERS, max_overflow=0, **JSON_CODEC
        )
        _sqlite_pragmas(sync_reader, "BEGIN")
        return Engines(writer, reader, sync_writer, sync_reader, Direct(sync_reader.dialect))


class PostgresDialect(Dialect):
    """The shared store: replicas claim runs with SKIP LOCKED and hear each other by NOTIFY."""

    name = "postgresql"
    single_replica = False
    notify_channel = CHANNEL
    select_run_for_write = SELECT_RUN_LOCKED
    select_tenant_run_for_write = SELECT_TENANT_RUN_LOCKED
    updates_run_with_step = True
    defers_writes = True

    def engines(self, url: sa.URL, stall_seconds: float = 0.0, client_name: str = "") -> Engines:
        # pg_stat_activity (and anything reading application_name) tells the replicas'
        # incarnations apart.
        named = {"application_name": client_name[:63]} if client_name else {}
        writer_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT, "server_settings": named}
        if stall_seconds > 0:
            # A stopped replica's open transaction would hold its run rows locked, and SKIP
            # LOCKED claims would skip them for as long as it stands still.
            writer_args["server_settings"] = {
                **named,
                "idle_in_transaction_session_timeout": str(max(int(stall_seconds * 1000), 1000)),
            }
        writer = create_async_engine(
            url,
            pool_size=4,
            max_overflow=4,
            pool_pre_ping=True,
            connect_args=writer_args,
            **JSON_CODEC,
        )
        # A read is several statements (a run, its steps, its clarifications): at READ
        # COMMITTED each would see its own snapshot, and a commit landing between them
        # showed a clarification pending beside its step still PENDING. Readers only
        # read, so REPEATABLE READ costs them no serialization failures.
        reader = create_async_engine(
            url,
            pool_size=8,
            max_overflow=8,
            pool_pre_ping=True,
            isolation_level="REPEATABLE READ",
            connect_args={"timeout": CONNECT_TIMEOUT, "server_settings": named},
            **JSON_CODEC,
        )
        # Marked statements run on asyncpg itself, in the writer's and readers' greenlets.
        return Engines(writer, reader, direct=AsyncpgPath(writer.sync_engine.dialect))

    def claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def order_events(self, stage: Callable[[Any], None]) -> None:
        # Event ids are WatchExecutions' cursor: they must grow in commit order across
        # replicas, so commits that write events take turns from first id to commit.
        stage(LOCK_EVENT_ORDER)

    async def lock_key(self, conn: Any, name: str) -> None:
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"), {"name": name}
        )

    async def lock_migrations(self, conn: AsyncConnection) -> None:
        await conn.execute(sa.text(f"SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        await conn.commit()

    async def unlock_migrations(self, conn: AsyncConnection) -> None:
        await conn.execute(sa.text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        await conn.commit()

    def cluster_bus(self, url: sa.URL, origin: str, handler: Handler) -> ClusterBus | None:
        return ClusterBus(url, origin, handler)


DIALECTS: dict[str, type[Dialect]] = {"sqlite": SqliteDialect, "postgresql": PostgresDialect}


def dialect_for(url: sa.URL) -> Dialect:
    """The dialect of a store URL (`sqlite+aiosqlite://...`, `postgresql+asyncpg://...`)."""
    backend = url.get_backend_name()
    if backend not in DIALECTS:
        raise ValueError(f"unsupported store {backend!r}: use sqlite or postgresql")
    return DIALECTS[backend]()

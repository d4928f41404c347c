"""Prebuilt statements run straight on the SQLite driver, in the writer's thread.

SQLAlchemy's execution path costs 15-30 us a statement over the driver's 3-6 us (cache lookup,
execution context, result metadata), and the writer runs some 40 statements a run. Statements
marked with `direct()` are compiled once per set of parameter names by SQLAlchemy's own
compiler, and their parameters and columns go through SQLAlchemy's own type processors: the
database sees what SQLAlchemy would have sent, and callers get the same values back.
Only what the store's units use is offered: `.mappings()` rows, `scalar_one()`, `rowcount`
and `inserted_primary_key`. Everything else takes the SQLAlchemy path. On PostgreSQL the same
statements run on asyncpg (store/asyncpg_path.py).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import MultipleResultsFound, NoResultFound

Processor = Callable[[Any], Any] | None
E = TypeVar("E", bound=sa.ClauseElement)
T = TypeVar("T")
_DIRECT: dict[int, sa.ClauseElement] = {}  # id -> statement (held, so ids are not reused)


def direct(statement: E) -> E:
    """Mark a prebuilt statement as fit for the driver path; returns it."""
    _DIRECT[id(statement)] = statement
    return statement


@dataclass(frozen=True)
class _Compiled:
    sql: str
    slots: tuple[tuple[str | None, Any, Processor], ...]  # (parameter, constant, processor)
    columns: tuple[tuple[str, Processor], ...]  # a SELECT's result keys and processors


class DirectResult:
    """What a driver-path statement returns: rows as dicts, and the cursor's counts."""

    def __init__(self, rows: list[dict[str, Any]], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.inserted_primary_key = (lastrowid,)

    def mappings(self) -> DirectResult:
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)

    def all(self) -> list[dict[str, Any]]:
        return self._rows

    def first(self) -> dict[str, Any] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> dict[str, Any]:
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalar_one(self) -> Any:
        return next(iter(self.one().values()))


class Direct:
    """Runs marked statements on one SQLite DBAPI connection (inside SQLAlchemy's open
    transaction on it)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[tuple[int, tuple[str, ...]], _Compiled] = {}

    @staticmethod
    def handles(statement: Any) -> bool:
        return id(statement) in _DIRECT

    def _compile(self, statement: sa.ClauseElement, keys: tuple[str, ...]) -> _Compiled:
        found = self._compiled.get((id(statement), keys))
        if found is not None:
            return found
        compiled: Any = statement.compile(dialect=self.dialect, column_keys=list(keys))
        processors = compiled._bind_processors
        given = set(keys)
        slots = []
        for name in compiled.positiontup or ():
            processor = processors.get(name)
            if name in given:
                slots.append((name, None, processor))
            else:  # a literal written into the statement (`status == "PENDING"`)
                value = compiled.binds[name].effective_value
                slots.append((None, processor(value) if processor else value, None))
        columns = tuple(
            (c.keyname, self._result_processor(c.type)) for c in compiled._result_columns
        )
        found = _Compiled(str(compiled), tuple(slots), columns)
        self._compiled[(id(statement), keys)] = found
        return found

    def _result_processor(self, type_: Any) -> Processor:
        """How a column's values come back from the driver (SQLite's driver gives no type)."""
        processor: Processor = type_._cached_result_processor(self.dialect, None)
        return processor

    def bind(
        self,
        statement: sa.ClauseElement,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    ) -> tuple[_Compiled, list[tuple[Any, ...]], bool]:
        """The statement's compiled form, its parameter rows as the driver takes them, and
        whether it is an executemany."""
        many = isinstance(parameters, list | tuple)
        rows_in: Sequence[Mapping[str, Any]]
        if isinstance(parameters, list | tuple):
            rows_in = parameters
        else:
            rows_in = [parameters or {}]  # type: ignore[list-item]
        plan = self._compile(statement, tuple(rows_in[0]) if rows_in else ())
        values = [
            tuple(
                (p(row[name]) if p else row[name]) if name is not None else constant
                for name, constant, p in plan.slots
            )
            for row in rows_in
        ]
        return plan, values, many

    @staticmethod
    def decode(plan: _Compiled, raw_rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        """Driver rows as the caller's dicts, through the columns' result processors."""
        columns = plan.columns
        return [
            {key: (p(v) if p else v) for (key, p), v in zip(columns, raw, strict=True)}
            for raw in raw_rows
        ]

    def run(
        self,
        sync: sa.Connection,
        statement: sa.ClauseElement,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    ) -> DirectResult:
        """Run `statement` on the driver connection under `sync` (in its open transaction)."""
        return self.execute(sync.connection.dbapi_connection, statement, parameters)

    def execute(
        self,
        dbapi_connection: Any,
        statement: sa.ClauseElement,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    ) -> DirectResult:
        plan, values, many = self.bind(statement, parameters)
        cursor = dbapi_connection.cursor()
        try:
            if many:
                cursor.executemany(plan.sql, values)
            else:
                cursor.execute(plan.sql, values[0])
            rows = self.decode(plan, cursor.fetchall()) if plan.columns else []
            return DirectResult(rows, cursor.rowcount, cursor.lastrowid)
        finally:
            cursor.close()


class Missed(Exception):
    """A deferred compare-and-set matched no row (`MISSED` in its error): the transaction is
    void, and its units run again writing as they go, where each sees its own miss."""


# What a checked statement (statements.checked) fails with when its compare-and-set misses.
MISSED = "compare-and-set missed"


class SyncConnection:
    """AsyncConnection's `execute` over a sync Connection, for units driven without an event
    loop (SQLite: in a store thread; PostgreSQL: inside run_sync's greenlet): the awaitable
    completes without suspending. With `direct`, marked statements go straight to the
    driver.

    With `defers` (PostgreSQL's group commits), `write` keeps a write whose result its unit
    does not need for later: before the next statement of the transaction, or its commit,
    the writes kept are run together, one executemany per statement (a round trip for all
    the units' step updates instead of one each). Writes to distinct rows commute, `write`
    runs what it kept before a second write to the same row, and the statements run in the
    order each was first kept (a new run's row before its steps'), so the database ends as if
    each write had run when made; a read always sees them all."""

    def __init__(
        self, conn: sa.Connection, direct: Direct | None = None, *, defers: bool = False
    ) -> None:
        self.sync = conn
        self._direct = direct
        self.defers = defers
        self._kept: list[tuple[Any, dict[str, Any]]] = []
        self._kept_rows: set[Hashable] = set()
        # Called whenever kept writes have run (a transaction's count of what they change).
        self.on_flush: Callable[[], None] | None = None

    async def execute(self, statement: Any, parameters: Any = None, *, flush: bool = True) -> Any:
        """Run `statement` now (after the writes kept, unless `flush` is False: a read whose
        caller accounts for them itself)."""
        if flush and self._kept:
            self._flush()
        return self._run(statement, parameters)

    async def write(
        self,
        statement: Any,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        rows: Iterable[Hashable],
    ) -> None:
        """Write `rows` (keys naming the rows the statement changes) now, or with `defers`
        before the transaction's next statement, with the parameters as they are now. A
        checked statement's miss then raises Missed from that statement, not from here."""
        if not self.defers:
            self._run(statement, parameters)
            return
        rows = tuple(rows)
        if not self._kept_rows.isdisjoint(rows):
            self._flush()
        self._kept_rows.update(rows)
        if isinstance(parameters, Mapping):
            self._kept.append((statement, dict(parameters)))
        else:
            self._kept.extend((statement, dict(p)) for p in parameters)

    async def flush(self) -> None:
        """Run the writes kept (a transaction does before its commit)."""
        if self._kept:
            self._flush()

    def _flush(self) -> None:
        groups: dict[tuple[int, tuple[str, ...]], tuple[Any, list[dict[str, Any]]]] = {}
        for statement, parameters in self._kept:
            groups.setdefault((id(statement), tuple(parameters)), (statement, []))[1].append(
                parameters
            )
        self._kept.clear()
        self._kept_rows.clear()
        try:
            for statement, rows in groups.values():
                self._run(statement, rows if len(rows) > 1 else rows[0])
        except sa.exc.DBAPIError as error:
            if MISSED in str(error.orig):
                raise Missed(str(error.orig)) from error
            raise
        if self.on_flush is not None:
            self.on_flush()

    def _run(self, statement: Any, parameters: Any) -> Any:
        if self._direct is not None and self._direct.handles(statement):
            return self._direct.run(self.sync, statement, parameters)
        return self.sync.execute(statement, parameters)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a unit of work awaited something other than the store")

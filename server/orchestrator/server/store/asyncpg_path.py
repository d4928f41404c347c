"""The driver path on PostgreSQL: statements marked `direct()` run straight on asyncpg.

Measured on the end-to-end bench, SQLAlchemy's execution on asyncpg took about 40% of the
server's busy time (compiled-cache lookup, execution context, its own prepared-statement LRU,
the cursor adapter, result metadata), for statements whose SQL and parameter shapes never
change. Here they are compiled once by SQLAlchemy's own PostgreSQL compiler, so the database
sees the SQL SQLAlchemy would send: `$n::TYPE` casts (asyncpg infers each parameter's type
from them), the parameters through SQLAlchemy's bind processors, JSON columns through the
codecs SQLAlchemy registered on the connection (the store's orjson encoder and decoder).

Each call runs inside the transaction SQLAlchemy opened on the connection (begun on first
use, exactly as SQLAlchemy's cursor would); the writer's and readers' units run in
`run_sync`'s greenlet, so a call awaits the driver through SQLAlchemy's `await_only`. A
failure is raised as SQLAlchemy would raise it (the DBAPI error, wrapped, the connection
invalidated when it is gone), so outage classification and the pool see what they always did.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.util import await_only

from orchestrator.server.store.direct import Direct, DirectResult, Processor

# asyncpg's status for a statement: "UPDATE 3", "DELETE 0", "INSERT 0 1", "SELECT 2".
_STATUS = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")


class AsyncpgPath(Direct):
    """Runs marked statements on an asyncpg connection that SQLAlchemy holds (`run_sync`)."""

    def _result_processor(self, type_: Any) -> Processor:
        try:
            return super()._result_processor(type_)
        except TypeError:
            # SQLAlchemy's numeric processors want the column's type oid. A Float that is not
            # asdecimal needs none: asyncpg gives float8 as a float.
            if isinstance(type_, sa.Float) and not type_.asdecimal:
                return None
            raise

    def run(
        self,
        sync: sa.Connection,
        statement: sa.ClauseElement,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    ) -> DirectResult:
        """Run `statement` on `sync`'s asyncpg connection, in its open transaction."""
        plan, values, many = self.bind(statement, parameters)
        adapted: Any = sync.connection.dbapi_connection
        try:
            if adapted._transaction is None:
                await_only(adapted._start_transaction())
            driver = adapted._connection
            if many:
                await_only(driver.executemany(plan.sql, values))
                return DirectResult([], -1, None)
            if plan.columns:
                raw = await_only(driver.fetch(plan.sql, *values[0]))
                rows = self.decode(plan, raw)
                if isinstance(statement, sa.Insert):
                    # The implicit RETURNING of the primary key: inserted_primary_key.
                    key = next(iter(rows[0].values())) if rows else None
                    return DirectResult([], len(rows), key)
                return DirectResult(rows, len(rows), None)
            status = await_only(driver.execute(plan.sql, *values[0]))
            found = _STATUS.match(status or "")
            return DirectResult([], int(found.group(1)) if found else -1, None)
        except Exception as error:
            _raise_as_sqlalchemy(sync, adapted, error, plan.sql, values)
            raise  # not reached: the line above raises


def _raise_as_sqlalchemy(
    sync: sa.Connection, adapted: Any, error: Exception, sql: str, values: list[Any]
) -> None:
    """Raise `error` as SQLAlchemy's own execution would have: asyncpg's error translated to
    the DBAPI's (the adapter's own table), then wrapped by the Connection, which invalidates
    it when the database is gone."""
    try:
        adapted._handle_exception(error)
    except Exception as dbapi_error:
        sync._handle_dbapi_exception(dbapi_error, sql, values, None, None)
        raise

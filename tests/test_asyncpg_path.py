"""The asyncpg driver path (store/asyncpg_path.py) against SQLAlchemy's own path, on a real
PostgreSQL database migrated to the store's schema: the same hot statements give the same
rows, counts and keys; a raw statement runs inside the unit's transaction (rolled back with
it); a failing one raises what SQLAlchemy raises."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from orchestrator.server.store import statements as st
from orchestrator.server.store.asyncpg_path import AsyncpgPath
from orchestrator.server.store.database import Database
from orchestrator.server.store.direct import Direct, SyncConnection, drive
from orchestrator.server.store.schema import runs
from tests.stores import drop_postgres_database, postgres_database

pytestmark = pytest.mark.postgres

RUN = {
    "run_id": "r1",
    "tenant_id": "t1",
    "status": "RUNNING",
    "plan_hash": "h",
    "plan": b"plan",
    "timeout_seconds": 60.0,
    "estimated_seconds": 0.5,
    "parameters": {"n": 1},
    "variables": {"k": [1, "two", None]},
    "created_at": 1.5,
    "updated_at": 1.5,
    "version": 1,
    "steps_total": 1,
    "steps_finished": 0,
    "last_sequence": 0,
    "owner": "me",
}
STEP = {
    "run_id": "r1",
    "step_id": "s0",
    "flow_id": "main",
    "position": 0,
    "tool": "core.echo",
    "status": "PENDING",
    "attempts": 0,
}


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    url = postgres_database()
    database = Database(url)
    try:
        yield database
    finally:
        await database.close()
        drop_postgres_database(url)


async def both(db: Database, unit: Any) -> tuple[Any, Any]:
    """`unit(conn)` on the SQLAlchemy path and on the driver path, each in a transaction
    that is rolled back (so both start from the same rows)."""
    results = []
    for path in (None, db.direct):

        def driven(sync: sa.Connection, path: Direct | None = path) -> Any:
            return drive(unit(SyncConnection(sync, path)))

        async with db.writer.connect() as conn:
            trans = await conn.begin()
            results.append(await conn.run_sync(driven))
            await trans.rollback()
    return results[0], results[1]


async def test_the_store_gets_the_driver_path_on_postgresql(db: Database) -> None:
    assert isinstance(db.direct, AsyncpgPath)


async def test_hot_statements_give_what_sqlalchemy_gives(db: Database) -> None:
    async def unit(conn: SyncConnection) -> list[Any]:
        seen: list[Any] = []
        inserted = await conn.execute(st.INSERT_RUN, RUN)
        seen.append(inserted.inserted_primary_key[0] is not None)
        await conn.execute(st.INSERT_STEPS, [STEP, {**STEP, "step_id": "s1", "position": 1}])
        row = (await conn.execute(st.SELECT_RUN_LOCKED, {"w_run_id": "r1"})).mappings().one()
        # Its pk comes from a sequence, which a rollback does not wind back.
        seen.append({k: v for k, v in row.items() if k != "pk"})
        changes = {"status": "COMPLETED", "output": {"x": 1.25}, "completed_at": 2.0}
        update = st.update_step_statement(tuple(changes))
        done = await conn.execute(update, st.bind(changes, run_id="r1", step_id="s0"))
        seen.append(done.rowcount)
        missed = await conn.execute(update, st.bind(changes, run_id="r1", step_id="nope"))
        seen.append(missed.rowcount)
        steps = await conn.execute(st.SELECT_OPEN_STEPS, {"w_run_id": "r1"})
        seen.append([dict(s) for s in steps.mappings()])
        step = await conn.execute(st.SELECT_STEP, {"w_run_id": "r1", "w_step_id": "s0"})
        seen.append(dict(step.mappings().one()))
        count = await conn.execute(st.COUNT_UNFINISHED, {"w_tenant_id": "t1"})
        seen.append(count.scalar_one())
        return seen

    ours, theirs = await both(db, unit)
    assert ours[0] is True and ours[2:4] == [1, 0]
    assert ours[1]["variables"] == {"k": [1, "two", None]} and ours[1]["created_at"] == 1.5
    assert ours[5]["output"] == {"x": 1.25} and ours[5]["status"] == "COMPLETED"
    assert [s["step_id"] for s in ours[4]] == ["s1"]
    assert ours == theirs


async def test_a_raw_statement_is_part_of_the_units_transaction(db: Database) -> None:
    """The first statement of a transaction on the driver path begins it: rolled back, the
    row is gone (in autocommit it would have stayed)."""
    await both(db, lambda conn: conn.execute(st.INSERT_RUN, RUN))
    async with db.writer.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(runs))).scalar_one()
    assert left == 0


async def test_a_failing_statement_raises_what_sqlalchemy_raises(db: Database) -> None:
    async def twice(conn: SyncConnection) -> None:
        await conn.execute(st.INSERT_RUN, RUN)
        await conn.execute(st.INSERT_RUN, RUN)

    for path in (None, db.direct):

        def driven(sync: sa.Connection, path: Direct | None = path) -> None:
            drive(twice(SyncConnection(sync, path)))

        async with db.writer.connect() as conn:
            with pytest.raises(sa.exc.IntegrityError) as caught:
                await conn.run_sync(driven)
            assert "runs_pkey" in str(caught.value) or "duplicate key" in str(caught.value)
            await conn.rollback()

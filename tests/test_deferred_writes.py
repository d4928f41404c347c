"""Deferred writes on PostgreSQL (SyncConnection.write): a group commit keeps its units' writes
and runs them together, one executemany per statement. Nothing may tell: a read sees them, a
row written twice ends as the second write left it, a write takes its parameters as they were
when made, and a compare-and-set that misses voids the transaction, whose units then run again
writing as they go, so the one that missed sees it where it writes and the others commit once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from orchestrator.server.store.database import Database
from orchestrator.server.store.direct import direct
from orchestrator.server.store.statements import checked
from orchestrator.server.store.writer import Tx, Writer
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.errors import details_of
from tests.stores import fetch

pytestmark = pytest.mark.postgres

scratch = sa.Table(
    "deferred_scratch",
    sa.MetaData(),
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("value", sa.String, nullable=False),
)
INSERT = direct(sa.insert(scratch))
SET_VALUE = direct(
    sa.update(scratch)
    .where(scratch.c.id == sa.bindparam("w_id"))
    .values(value=sa.bindparam("v_value", type_=sa.String))
)
COMPARE_AND_SET = direct(
    sa.update(scratch)
    .where(scratch.c.id == sa.bindparam("w_id"), scratch.c.version == sa.bindparam("w_version"))
    .values(
        value=sa.bindparam("v_value", type_=sa.String),
        version=sa.bindparam("v_version", type_=sa.Integer),
    )
)
SELECT = direct(sa.select(scratch.c.value).where(scratch.c.id == sa.bindparam("w_id")))


@pytest.fixture
async def writer(pg_url: str) -> AsyncIterator[Writer]:
    db = Database(pg_url)
    await db.migrate()
    async with db.writer.begin() as conn:
        await conn.run_sync(scratch.create)
    writer = Writer(db.writer, direct=db.direct, defer_writes=True)
    writer.start()
    try:
        yield writer
    finally:
        await writer.stop()
        await db.close()


def rows(url: str) -> dict[str, tuple[int, str]]:
    found = fetch(url, "SELECT id, version, value FROM deferred_scratch")
    return {r["id"]: (r["version"], r["value"]) for r in found}


async def test_kept_writes_are_read_in_order_and_as_they_were_made(
    writer: Writer, pg_url: str
) -> None:
    async def unit(tx: Tx) -> list[str]:
        assert tx.conn.defers
        row = {"id": "a", "version": 1, "value": "first"}
        await tx.conn.write(INSERT, row, [("scratch", "a")])
        row["value"] = "changed after the write"  # the write took it as it was
        await tx.conn.write(
            INSERT,
            [{"id": "b", "version": 1, "value": "b"}, {"id": "c", "version": 1, "value": "c"}],
            [("scratch", "b"), ("scratch", "c")],
        )
        # A second write to a kept row runs what was kept first.
        await tx.conn.write(SET_VALUE, {"w_id": "a", "v_value": "second"}, [("scratch", "a")])
        await tx.conn.write(SET_VALUE, {"w_id": "b", "v_value": "b2"}, [("scratch", "b")])
        # A read sees every write kept so far.
        seen = (await tx.conn.execute(SELECT, {"w_id": "a"})).mappings().one()["value"]
        await tx.conn.write(SET_VALUE, {"w_id": "c", "v_value": "c2"}, [("scratch", "c")])
        return [seen]

    assert await writer.run(unit) == ["second"]
    # The last write, kept until the commit, is committed with it.
    assert rows(pg_url) == {"a": (1, "second"), "b": (1, "b2"), "c": (1, "c2")}


async def test_a_missed_compare_and_set_runs_the_batch_again_writing_as_it_goes(
    writer: Writer, pg_url: str
) -> None:
    async def seed(tx: Tx) -> None:
        await tx.conn.execute(INSERT, [{"id": k, "version": 1, "value": "v1"} for k in "xyz"])

    await writer.run(seed)
    calls: dict[str, int] = {}

    def setting(key: str, version: int) -> Any:
        async def unit(tx: Tx) -> str:
            calls[key] = calls.get(key, 0) + 1
            params = {"w_id": key, "w_version": version, "v_version": version + 1, "v_value": "v2"}
            if tx.conn.defers:
                await tx.conn.write(checked(COMPARE_AND_SET), params, [("scratch", key)])
                return "kept"
            result = await tx.conn.execute(COMPARE_AND_SET, params)
            return "written" if result.rowcount == 1 else "missed"

        return unit

    # One batch: y's unit compares with a version the row no longer has.
    results = await asyncio.gather(
        writer.submit(setting("x", 1)),
        writer.submit(setting("y", 7)),
        writer.submit(setting("z", 1)),
    )
    assert list(results) == ["written", "missed", "written"]
    assert writer.missed == 1
    assert calls == {"x": 2, "y": 2, "z": 2}
    assert rows(pg_url) == {"x": (2, "v2"), "y": (1, "v1"), "z": (2, "v2")}

    # Alone and matching, it is kept and committed with no second run.
    assert await writer.run(setting("y", 1)) == "kept"
    assert writer.missed == 1
    assert rows(pg_url)["y"] == (2, "v2")


async def test_a_tenants_quota_holds_for_runs_accepted_in_one_group_commit(
    tmp_path: Path, pg_url: str
) -> None:
    """Runs asked for at once, some of the tenant's runs ending meanwhile, and then again: the
    quota counts once a transaction and follows that transaction's own writes."""
    settings = make_settings(
        tmp_path, pg_url, max_runs_per_tenant=4, execute_rate=1000, execute_burst=100
    )
    tenant = str(uuid.uuid4())
    waiting = plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}})
    instant = plan_of({"stepId": "e", "tool": "core.echo", "parameters": {"m": "hi"}})
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)

        async def execute(plan: pb.ExecutablePlan) -> str:
            try:
                await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
            except grpc.aio.AioRpcError as err:
                details = details_of(err)
                assert (details.code, details.reason) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TENANT_QUOTA_EXCEEDED",
                )
                return "refused"
            return "accepted"

        outcomes = await asyncio.gather(
            *(execute(instant) for _ in range(2)), *(execute(waiting) for _ in range(12))
        )
        accepted_waiting = outcomes[2:].count("accepted")
        await asyncio.sleep(0.5)  # the instant runs end: their places are free again
        outcomes = await asyncio.gather(*(execute(waiting) for _ in range(12)))
        accepted_waiting += outcomes.count("accepted")
        assert srv.writer.missed == 0
    unfinished = fetch(
        pg_url,
        "SELECT count(*) AS n FROM runs WHERE tenant_id = $1 AND status IN "
        "('PENDING', 'RUNNING', 'PAUSED')",
        tenant,
    )[0]["n"]
    # The runs that wait were admitted within the quota, and it was used up.
    assert unfinished == accepted_waiting == 4

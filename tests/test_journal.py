"""The journal's engine units do not read the run's row: they compare-and-set the row this
process last committed. A row changed behind its back (another replica's Pause, a claim) must
make the unit read the store and follow it, never write over it."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.server.app import Server
from orchestrator.server.lifecycle import Action
from orchestrator.server.store.journal import LeaseLost
from orchestrator.server.store.records import Created
from orchestrator.server.store.statements import SELECT_RUN, SELECT_RUN_INPUTS, SELECT_STEPS
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.stores import fetch


async def store_row(url: str, run_id: str) -> dict[str, Any]:
    """The run's status, version and owner, and its one step's attempts, as the store has
    them (read off the test's loop, which the server under test shares)."""
    sql = "SELECT status, version, owner FROM runs WHERE run_id = $1"
    run = (await asyncio.to_thread(fetch, url, sql, run_id))[0]
    sql = "SELECT attempts FROM steps WHERE run_id = $1"
    step = (await asyncio.to_thread(fetch, url, sql, run_id))[0]
    return {**run, "attempts": step["attempts"]}


async def behind_its_back(url: str, run_id: str, **values: Any) -> None:
    """Another writer's change to the run row (a replica's control call, a claim)."""
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, 1))
    sql = f"UPDATE runs SET {sets} WHERE run_id = ${len(values) + 1}"
    await asyncio.to_thread(fetch, url, sql, *values.values(), run_id)


async def test_a_unit_on_a_row_changed_behind_its_back_follows_the_store(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, park_after_seconds=600.0)
    tenant = str(uuid.uuid4())
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        plan = plan_of({"stepId": "w", "tool": "core.wait_for_signal", "parameters": {}})
        plan.flows[0].steps[0].parameters.update({"signal_name": "go"})
        started: pb.ExecuteResponse = await stub.Execute(
            pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)
        )
        run_id = started.run_id
        deadline = time.monotonic() + 30
        while (await store_row(database_url, run_id))["attempts"] < 1:
            assert time.monotonic() < deadline, "the step never started"
            await asyncio.sleep(0.05)
        journal = srv.engine.journal
        before = await store_row(database_url, run_id)
        assert before["status"] == "RUNNING" and before["owner"] == journal.owner

        # Paused elsewhere: the cached row still says RUNNING, at the old version.
        paused = {"status": "PAUSED", "version": before["version"] + 1}
        await behind_its_back(database_url, run_id, **paused)
        start = journal.start_step(run_id, "w", before["attempts"] + 1)
        assert await start.committed() is None, "a step started on a run paused elsewhere"
        after = await store_row(database_url, run_id)
        assert after == {**before, **paused}, "the unit wrote over the other writer's row"

        # Claimed by another incarnation at the version this process last committed: only
        # the owner in the compare-and-set tells.
        await behind_its_back(
            database_url, run_id, status="RUNNING", version=before["version"], owner="other#1"
        )
        with pytest.raises(LeaseLost):
            await journal.start_step(run_id, "w", before["attempts"] + 1).committed()
        claimed = await store_row(database_url, run_id)
        assert claimed == {**before, "owner": "other#1"}, "a unit wrote to a run it lost"
        # On PostgreSQL each write was kept for the commit and its compare-and-set missed
        # there: the unit ran again, writing as it went, and found what it found above.
        assert srv.writer.missed == (2 if srv.db.dialect.defers_writes else 0)


async def created_here(srv: Server, tenant: str, plan: pb.ExecutablePlan) -> Created:
    """A run created as Execute creates one, its task not started."""
    request = pb.ExecuteRequest(executable_plan=plan)
    checked = srv.control.check_request(tenant, request)
    new = srv.control.new_run(tenant, "", request, checked, 0.0)
    created = await srv.store.create_run(new)
    srv.engine.settle(new.run_id)
    return created


async def test_a_run_created_here_opens_from_the_rows_it_was_created_with(
    tmp_path: Path, database_url: str
) -> None:
    """The rows a new run's first task starts from are the rows the store reads back: every
    column, the same values."""
    async with running(make_settings(tmp_path, database_url)) as srv:
        plan = plan_of(
            {"stepId": "a", "tool": "core.echo", "parameters": {"v": 1}},
            {"stepId": "b", "tool": "core.echo", "parameters": {}, "dependsOn": ["a"]},
        )
        created = await created_here(srv, str(uuid.uuid4()), plan)
        inserted = created.inserted
        assert inserted is not None
        run_id = created.execution.run_id

        async def read(conn: Any) -> tuple[Any, ...]:
            where = {"w_run_id": run_id}
            run = (await conn.execute(SELECT_RUN, where)).mappings().one()
            inputs = (await conn.execute(SELECT_RUN_INPUTS, where)).mappings().one()
            steps = (await conn.execute(SELECT_STEPS, where)).mappings().all()
            return dict(run), dict(inputs), [dict(s) for s in steps]

        run, inputs, steps = await srv.db.read(read)
        if "pk" not in inserted.run:
            # PostgreSQL keeps the insert for the group commit: the key is given then.
            assert srv.db.dialect.defers_writes
            del run["pk"]
        assert inserted.run == run
        assert inserted.inputs == inputs
        assert inserted.steps == steps


async def test_a_run_changed_between_its_creation_and_its_task_is_followed_not_written_over(
    tmp_path: Path, database_url: str
) -> None:
    """A run created to run here, started by the unit creating it, opens from its rows
    without reading them; cancelled in between, the first compare-and-set on them (its first
    step's) misses, and the task follows the store."""
    tenant = str(uuid.uuid4())
    async with running(make_settings(tmp_path, database_url)) as srv:
        plan = plan_of({"stepId": "a", "tool": "core.echo", "parameters": {}})
        created = await created_here(srv, tenant, plan)
        assert created.inserted is not None
        assert created.inserted.run["status"] == "RUNNING"
        assert created.execution.status == pb.EXECUTION_STATUS_PENDING  # as created
        run_id = created.execution.run_id
        await srv.control.store.control(tenant, run_id, Action.CANCEL, "changed my mind")
        cancelled = await store_row(database_url, run_id)
        journal = srv.engine.journal
        try:
            row, _, _, _ = await journal.open(run_id, created.inserted)
            # Started by its creation: the rows as created, checked by its first write.
            assert row["status"] == "RUNNING"
            start = journal.start_step(run_id, "a", 1)
            assert await start.committed() is None, "a step started on a cancelled run"
        finally:
            journal.forget(run_id)
        assert cancelled["status"] == "CANCELLED"
        assert await store_row(database_url, run_id) == cancelled

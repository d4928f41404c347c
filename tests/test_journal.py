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
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator.server.store.journal import LeaseLost
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running


async def store_row(url: str, run_id: str) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                sa.text("SELECT status, version, owner FROM runs WHERE run_id = :r"), {"r": run_id}
            )
            row = dict(found.mappings().one())
            steps = await conn.execute(
                sa.text("SELECT attempts FROM steps WHERE run_id = :r"), {"r": run_id}
            )
            row["attempts"] = steps.scalar_one()
            return row
    finally:
        await engine.dispose()


async def behind_its_back(url: str, run_id: str, **values: Any) -> None:
    """Another writer's change to the run row (a replica's control call, a claim)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            sets = ", ".join(f"{k} = :{k}" for k in values)
            await conn.execute(
                sa.text(f"UPDATE runs SET {sets} WHERE run_id = :r"), {**values, "r": run_id}
            )
    finally:
        await engine.dispose()


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

"""Instant steps made one after another are written together (`Journal.chain`): each link's
start and outcome, and the run's end when they end it, in one unit. What a caller sees must
not change: every step's two events in order, each showing the run as that step left it;
and a chain the store no longer takes (a Pause landed meanwhile) is written not at all and
made again later, each step still attempted once as far as the store knows."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format

from orchestrator.server.lifecycle import Action, StepStatus
from orchestrator.server.store.journal import Ending, LeaseLost, Link, Outcome
from orchestrator.server.tools import Tool, ToolContext, default_registry
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.stores import fetch
from tests.test_journal import behind_its_back, created_here
from tests.test_watch import collect

if TYPE_CHECKING:
    from tests.test_watch import Stub

ECHOES = [
    {"stepId": "a", "tool": "core.echo", "parameters": {"n": 1}},
    {"stepId": "b", "tool": "core.echo", "parameters": {"n": "{{ steps.a.output.n }}"}},
    {"stepId": "c", "tool": "core.set", "parameters": {"k": "{{ steps.b.output.n }}"}},
]


async def events_of(stub: Stub, tenant: str, run_id: str) -> list[pb.ExecutionEvent]:
    """Every event of a finished run, from its first."""
    events, code = await collect(stub, tenant, run_id, after=1)
    assert code == grpc.StatusCode.OK
    return events


async def test_instant_steps_and_the_runs_end_are_one_write_and_each_event_shows_its_moment(
    tmp_path: Path, database_url: str
) -> None:
    tenant = str(uuid.uuid4())
    async with running(make_settings(tmp_path, database_url)) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            writer = srv.store.writer
            before = writer.units
            reply = await stub.Execute(
                pb.ExecuteRequest(executable_plan=plan_of(*ECHOES), async_execution=False),
                metadata=md(tenant),
            )
            units = writer.units - before
            execution = reply.execution
            assert execution.status == pb.EXECUTION_STATUS_COMPLETED
            assert {s.step_id: s.attempts for s in execution.steps} == {"a": 1, "b": 1, "c": 1}
            # Each step's output was made from the one before it, held, not yet written.
            results = json_format.MessageToDict(execution.results)
            assert results["c"]["k"] == results["a"]["n"] == 1
            # Its creation (which starts it), then every step and its end at once.
            assert units == 2
            events = await events_of(stub, tenant, reply.run_id)
        assert [e.sequence for e in events] == list(range(2, 2 + len(events)))
        steps = [e for e in events if e.step_id]
        assert [(e.step_id, e.type) for e in steps] == [
            (sid, kind)
            for sid in "abc"
            for kind in (pb.EVENT_TYPE_STEP_STARTED, pb.EVENT_TYPE_STEP_COMPLETED)
        ]
        # Each step's events show the run as that step left it, not as the unit left it.
        for i, sid in enumerate("abc"):
            for event in (steps[2 * i], steps[2 * i + 1]):
                assert event.execution.status == pb.EXECUTION_STATUS_RUNNING
                assert event.execution.current_step == sid
                assert event.execution.progress == pytest.approx((i + 1) / 3)
        assert events[-1].type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
        assert events[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED
        by_id = {s.step_id: s for s in execution.steps}
        for first, then in (("a", "b"), ("b", "c")):
            done = by_id[first].completed_at.ToNanoseconds()
            assert done <= by_id[then].started_at.ToNanoseconds()


async def test_a_chain_on_a_run_paused_or_claimed_behind_its_back_writes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    tenant = str(uuid.uuid4())
    async with running(make_settings(tmp_path, database_url)) as srv:
        created = await created_here(srv, tenant, plan_of(*ECHOES[:2]))
        run_id = created.execution.run_id
        journal = srv.engine.journal
        sql = "SELECT status, version, owner, last_sequence FROM runs WHERE run_id = $1"
        try:
            _, step_rows, _, _ = await journal.open(run_id, created.inserted)
            at = time.time()
            links = [
                Link(s["step_id"], s, 1, at, Outcome(s["step_id"], StepStatus.COMPLETED, {}), at)
                for s in step_rows
            ]
            stored = (await asyncio.to_thread(fetch, database_url, sql, run_id))[0]
            paused = {"status": "PAUSED", "version": stored["version"] + 1}
            await behind_its_back(database_url, run_id, **paused)
            assert await journal.chain(run_id, links, Ending(Action.COMPLETE)) is None
            after = (await asyncio.to_thread(fetch, database_url, sql, run_id))[0]
            assert after == {**stored, **paused}, "a chain wrote over another writer's row"

            await behind_its_back(
                database_url, run_id, status="RUNNING", version=stored["version"], owner="o#1"
            )
            with pytest.raises(LeaseLost):
                await journal.chain(run_id, links)
            claimed = (await asyncio.to_thread(fetch, database_url, sql, run_id))[0]
            assert claimed == {**stored, "owner": "o#1"}, "a chain wrote to a run it lost"

            # Its own again: the chain is taken, the steps and the end with it.
            await behind_its_back(database_url, run_id, owner=journal.owner)
            chained = await journal.chain(run_id, links, Ending(Action.COMPLETE))
            assert chained is not None and chained.ended
        finally:
            journal.forget(run_id)
        done = (await asyncio.to_thread(fetch, database_url, sql, run_id))[0]
        assert done["status"] == "COMPLETED"
        assert done["last_sequence"] == stored["last_sequence"] + 5  # 2 steps x 2, the end
        steps_sql = "SELECT status, attempts FROM steps WHERE run_id = $1"
        rows = await asyncio.to_thread(fetch, database_url, steps_sql, run_id)
        assert [(r["status"], r["attempts"]) for r in rows] == [("COMPLETED", 1)] * 2


async def test_a_pause_landing_while_steps_are_held_drops_them_and_they_run_after_resume(
    tmp_path: Path, database_url: str
) -> None:
    """`b`, an instant tool, pauses its own run the first time it is called: `a`, made but
    held, is not written; after Resume both are made again and written once."""
    tenant = str(uuid.uuid4())
    calls: list[int] = []
    paused = asyncio.Event()
    holder: dict[str, Any] = {}

    async def pause_once(ctx: ToolContext, params: dict[str, Any]) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            await holder["srv"].control.control(ctx.tenant_id, ctx.run_id, Action.PAUSE, "hold")
            paused.set()
        return params

    registry = default_registry(load_entry_points=False)
    registry.register(Tool("test.pause_once", pause_once, instant=True))
    plan = plan_of(
        ECHOES[0],
        {"stepId": "b", "tool": "test.pause_once", "parameters": {"n": 2}},
        ECHOES[2],
    )
    plan.security_context.allowed_tools.append("test.pause_once")
    async with running(make_settings(tmp_path, database_url), registry=registry) as srv:
        holder["srv"] = srv
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            reply = await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
            await asyncio.wait_for(paused.wait(), 30)
            got = await stub.GetExecution(
                pb.GetExecutionRequest(run_id=reply.run_id), metadata=md(tenant)
            )
            assert got.execution.status == pb.EXECUTION_STATUS_PAUSED
            assert {s.step_id: s.attempts for s in got.execution.steps} == {"a": 0, "b": 0, "c": 0}
            await stub.Resume(pb.ResumeRequest(run_id=reply.run_id), metadata=md(tenant))
            deadline = time.monotonic() + 30
            while True:
                got = await stub.GetExecution(
                    pb.GetExecutionRequest(run_id=reply.run_id), metadata=md(tenant)
                )
                if got.execution.status == pb.EXECUTION_STATUS_COMPLETED:
                    break
                assert time.monotonic() < deadline, f"still {got.execution}"
                await asyncio.sleep(0.05)
            events = await events_of(stub, tenant, reply.run_id)
        assert {s.step_id: s.attempts for s in got.execution.steps} == {"a": 1, "b": 1, "c": 1}
        assert calls == [1, 1]  # the dropped call and the one written, both attempt 1
        assert [e.sequence for e in events] == list(range(2, 2 + len(events)))
        started = [e.step_id for e in events if e.type == pb.EVENT_TYPE_STEP_STARTED]
        assert started == ["a", "b", "c"]

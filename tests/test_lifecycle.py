"""The state machine as data, and the store's compare-and-set, without gRPC."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.server.errors import Conflict, InvalidTransition
from orchestrator.server.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    Action,
    RunStatus,
    next_status,
)
from orchestrator.server.store.database import Database
from orchestrator.server.store.records import EventSpec, NewRun, NewStep
from orchestrator.server.store.runs import RunStore
from orchestrator.server.store.writer import Tx, Unit, Writer
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import echo_plan, sqlite_url

CONTROLS = [Action.PAUSE, Action.RESUME, Action.CANCEL]


def test_terminal_states_are_left_only_by_retry() -> None:
    for (source, action), target in TRANSITIONS.items():
        assert source not in TERMINAL or (action is Action.RETRY and target is RunStatus.RUNNING)
    for status in TERMINAL:
        for action in Action:
            if action is not Action.RETRY:
                assert next_status(status, action) is None
        assert next_status(status, Action.RETRY) is RunStatus.RUNNING
    for status in set(RunStatus) - TERMINAL:
        assert next_status(status, Action.RETRY) is None


def test_control_table_matches_design() -> None:
    allowed = {(s, a) for (s, a) in TRANSITIONS if a in CONTROLS}
    assert allowed == {
        (RunStatus.PENDING, Action.PAUSE),
        (RunStatus.RUNNING, Action.PAUSE),
        (RunStatus.PAUSED, Action.RESUME),
        (RunStatus.PENDING, Action.CANCEL),
        (RunStatus.RUNNING, Action.CANCEL),
        (RunStatus.PAUSED, Action.CANCEL),
    }


async def open_store(path: Path) -> tuple[Database, Writer, RunStore]:
    db = Database(sqlite_url(path))
    await db.migrate()
    writer = Writer(db.writer)
    writer.start()
    return db, writer, RunStore(db, writer)


async def new_run(store: RunStore, tenant: str) -> str:
    run_id = str(uuid.uuid4())
    await store.create_run(
        NewRun(
            run_id=run_id,
            tenant_id=tenant,
            plan=echo_plan(2),
            plan_hash="sha256:x",
            parameters={},
            variables={},
            dry_run=False,
            triggered_by="",
            correlation_id="",
            timeout_seconds=600,
            estimated_seconds=1,
            steps=[NewStep("s0", "main", 0, "core.echo"), NewStep("s1", "main", 1, "core.echo")],
        )
    )
    return run_id


@settings(max_examples=40, deadline=None)
@given(actions=st.lists(st.sampled_from(CONTROLS), max_size=8))
def test_store_follows_the_table_and_logs_every_change(
    tmp_path_factory: pytest.TempPathFactory, actions: list[Action]
) -> None:
    async def scenario() -> None:
        db, writer, store = await open_store(tmp_path_factory.mktemp("sm") / "sm.db")
        tenant = str(uuid.uuid4())
        run_id = await new_run(store, tenant)
        model = RunStatus.PENDING
        expected_events = 1
        for action in actions:
            target = next_status(model, action)
            if target is None:
                with pytest.raises(InvalidTransition):
                    await store.control(tenant, run_id, action, "")
            else:
                result = await store.control(tenant, run_id, action, "")
                assert result.status is target
                model = target
                expected_events += 1
                if target is RunStatus.CANCELLED:
                    expected_events += 2  # each of the two open steps: its STEP_FAILED
        execution = await store.get_execution(tenant, run_id)
        assert execution.status == pb.ExecutionStatus.Value(f"EXECUTION_STATUS_{model.value}")
        events = [
            pb.ExecutionEvent.FromString(r.payload) for r in await store.read_events(run_id, 0)
        ]
        assert [e.sequence for e in events] == list(range(1, expected_events + 1))
        assert execution.last_sequence == expected_events
        await writer.stop()
        await db.close()

    asyncio.run(scenario())


async def test_compare_and_set_lets_exactly_one_of_two_stale_writers_win(tmp_path: Path) -> None:
    db, writer, store = await open_store(tmp_path / "cas.db")
    tenant = str(uuid.uuid4())
    run_id = await new_run(store, tenant)
    await store.control(tenant, run_id, Action.PAUSE, "")

    async def read(tx: Tx) -> dict[str, object]:
        return await store._locked_row(tx, tenant, run_id)

    seen = await writer.run(read)  # both writers decide from the same PAUSED row

    def move(status: RunStatus) -> Unit[dict[str, Any]]:
        async def unit(tx: Tx) -> dict[str, Any]:
            return await store.update_run(
                tx,
                seen,
                {"status": status.value},
                [EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, status.value)],
            )

        return unit

    results = await asyncio.gather(
        writer.run(move(RunStatus.CANCELLED)),
        writer.run(move(RunStatus.RUNNING)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1
    assert sum(isinstance(r, dict) for r in results) == 1
    events = await store.read_events(run_id, 0)
    assert len(events) == 3, "the loser wrote no event"
    await writer.stop()
    await db.close()


async def test_a_failing_unit_does_not_spoil_its_batch(tmp_path: Path) -> None:
    db, writer, store = await open_store(tmp_path / "batch.db")
    tenant = str(uuid.uuid4())
    run_ids = [str(uuid.uuid4()) for _ in range(5)]

    async def fail(tx: Tx) -> None:
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(new_run(store, tenant) for _ in run_ids), writer.run(fail), return_exceptions=True
    )
    assert isinstance(results[-1], RuntimeError)
    created = [r for r in results[:-1] if isinstance(r, str)]
    assert len(created) == 5
    for run_id in created:
        assert (await store.get_execution(tenant, run_id)).run_id == run_id
    assert writer.commits < writer.units + 2
    await writer.stop()
    await db.close()

"""The plan store and schedules (issue 18), over real servers on SQLite and PostgreSQL: Execute
by hash, one run per fire time, overlap policies, pause, catch-up across a restart, and the
validation a caller sees."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, md, plan_of, running
from tests.errors import details_of

if TYPE_CHECKING:
    Stub = pb_grpc.OrchestratorServiceAsyncStub

WAITING = plan_of({"stepId": "hold", "tool": "core.wait", "parameters": {"seconds": 60}})


def every(seconds: float, schedule_id: str = "", **fields: Any) -> pb.Schedule:
    """An interval schedule of `plan` (default: a three-step echo)."""
    plan = fields.pop("plan", None)
    schedule = pb.Schedule(schedule_id=schedule_id or f"s-{uuid.uuid4().hex[:8]}", **fields)
    if plan is not None:
        schedule.executable_plan.CopyFrom(plan)
    elif not schedule.plan_hash:
        schedule.executable_plan.CopyFrom(echo_plan())
    schedule.interval.FromNanoseconds(int(seconds * 1e9))
    return schedule


async def create(stub: Stub, tenant: str, schedule: pb.Schedule) -> pb.Schedule:
    response = await stub.CreateSchedule(
        pb.CreateScheduleRequest(schedule=schedule), metadata=md(tenant)
    )
    return response.schedule


async def get(stub: Stub, tenant: str, schedule_id: str) -> pb.Schedule:
    response = await stub.GetSchedule(
        pb.GetScheduleRequest(schedule_id=schedule_id), metadata=md(tenant)
    )
    return response.schedule


async def runs_of(stub: Stub, tenant: str, schedule_id: str) -> list[pb.Execution]:
    """The schedule's runs, oldest first, found by their label."""
    flt = pb.ExecutionFilter(labels={"schedule_id": schedule_id})
    response = await stub.ListExecutions(
        pb.ListExecutionsRequest(filter=flt, page_size=500), metadata=md(tenant)
    )
    return list(reversed(response.executions))


def fire_time(run: pb.Execution) -> float:
    """The fire time a scheduled run was started for (its correlation id names it)."""
    stamp = run.correlation_id.rsplit("/", 1)[-1]
    return datetime.fromisoformat(stamp).timestamp()


async def pause(stub: Stub, tenant: str, schedule_id: str) -> pb.Schedule:
    response = await stub.PauseSchedule(
        pb.PauseScheduleRequest(schedule_id=schedule_id), metadata=md(tenant)
    )
    return response.schedule


async def wait_runs(stub: Stub, tenant: str, schedule_id: str, n: int, within: float) -> list[Any]:
    deadline = time.monotonic() + within
    while True:
        found = await runs_of(stub, tenant, schedule_id)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def consecutive(times: list[float], step: float) -> bool:
    return all(abs((b - a) - step) < 1e-3 for a, b in itertools.pairwise(times))


# ---------------------------------------------------------------- the plan store


async def test_execute_by_hash_runs_the_stored_plan_and_other_tenants_see_none(
    stub: Stub, tenant: str
) -> None:
    plan = echo_plan(2)
    first = await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    plan_hash = first.execution.plan_hash
    again = await stub.Execute(
        pb.ExecuteRequest(plan_hash=plan_hash, async_execution=False), metadata=md(tenant)
    )
    assert again.run_id != first.run_id
    assert again.execution.plan_hash == plan_hash
    assert again.execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert [s.step_id for s in again.execution.steps] == ["s0", "s1"]

    stored = (await stub.GetPlan(pb.GetPlanRequest(plan_hash=plan_hash), metadata=md(tenant))).plan
    assert stored.executable_plan == plan
    assert (stored.plan_id, stored.name) == ("test", "test plan")
    assert stored.last_run_at.ToNanoseconds() >= stored.created_at.ToNanoseconds()
    listed = (await stub.ListPlans(pb.ListPlansRequest(), metadata=md(tenant))).plans
    assert [p.plan_hash for p in listed] == [plan_hash]  # stored once, however often run
    assert not listed[0].HasField("executable_plan")

    other = str(uuid.uuid4())
    for call in (
        stub.Execute(pb.ExecuteRequest(plan_hash=plan_hash), metadata=md(other)),
        stub.GetPlan(pb.GetPlanRequest(plan_hash=plan_hash), metadata=md(other)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        found = details_of(caught.value)
        assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "PLAN_NOT_FOUND")
    assert not (await stub.ListPlans(pb.ListPlansRequest(), metadata=md(other))).plans


async def test_list_plans_pages_newest_first(stub: Stub, tenant: str) -> None:
    hashes = []
    for n in range(1, 6):
        response = await stub.Execute(
            pb.ExecuteRequest(executable_plan=echo_plan(n), dry_run=True), metadata=md(tenant)
        )
        hashes.append(response.execution.plan_hash)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListPlans(
            pb.ListPlansRequest(page_size=2, page_token=token), metadata=md(tenant)
        )
        seen += [p.plan_hash for p in page.plans]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(hashes))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListPlans(pb.ListPlansRequest(page_token=token or "bogus"), metadata=md(tenant))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- firing


async def test_every_second_makes_one_run_per_fire_time_with_the_labels(
    stub: Stub, tenant: str
) -> None:
    made = await create(
        stub,
        tenant,
        every(1, labels={"team": "data"}, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL),
    )
    first = made.next_fire_times[0].ToNanoseconds() / 1e9
    assert consecutive([t.ToNanoseconds() / 1e9 for t in made.next_fire_times], 1.0)
    await asyncio.sleep(first - time.time() + 5.2)
    paused = await pause(stub, tenant, made.schedule_id)
    await asyncio.sleep(0.3)
    found = await runs_of(stub, tenant, made.schedule_id)
    times = [fire_time(r) for r in found]
    assert 5 <= len(found) <= 6
    assert times[0] == pytest.approx(first, abs=1e-3)
    assert consecutive(times, 1.0)  # each fire time once, none missing
    for run in found:
        assert dict(run.labels) == {"team": "data", "schedule_id": made.schedule_id}
        assert run.triggered_by == f"schedule/{made.schedule_id}"
    assert paused.started_count == len(found)
    assert {a.run_id for a in paused.recent_actions} == {r.run_id for r in found}
    assert not paused.next_fire_times


async def test_skip_makes_no_second_run_while_one_is_going(stub: Stub, tenant: str) -> None:
    made = await create(stub, tenant, every(1, plan=WAITING, overlap_policy=pb.OVERLAP_POLICY_SKIP))
    found = await wait_runs(stub, tenant, made.schedule_id, 1, 3)
    assert len(found) == 1
    await asyncio.sleep(2.5)
    assert [r.run_id for r in await runs_of(stub, tenant, made.schedule_id)] == [found[0].run_id]
    schedule = await get(stub, tenant, made.schedule_id)
    assert schedule.skipped_count >= 2
    assert {a.outcome for a in schedule.recent_actions} == {"STARTED", "SKIPPED"}


async def test_buffer_one_makes_exactly_one_run_after_the_running_one(
    stub: Stub, tenant: str
) -> None:
    made = await create(
        stub, tenant, every(1, plan=WAITING, overlap_policy=pb.OVERLAP_POLICY_BUFFER_ONE)
    )
    found = await wait_runs(stub, tenant, made.schedule_id, 1, 3)
    await asyncio.sleep(2.5)  # two or three fire times while the first run waits
    assert len(await runs_of(stub, tenant, made.schedule_id)) == 1
    schedule = await get(stub, tenant, made.schedule_id)
    buffered = [a for a in schedule.recent_actions if a.outcome == "BUFFERED"]
    assert len(buffered) == 1 and schedule.skipped_count >= 1
    await stub.Cancel(pb.CancelRequest(run_id=found[0].run_id), metadata=md(tenant))
    after = await wait_runs(stub, tenant, made.schedule_id, 2, 3)
    # The buffered fire time started as soon as the first run ended, not at the next fire.
    assert fire_time(after[1]) == pytest.approx(buffered[0].fire_time.ToNanoseconds() / 1e9)
    await asyncio.sleep(1.5)  # the second run waits too: later fire times buffer, one only
    after = await runs_of(stub, tenant, made.schedule_id)
    assert len(after) == 2
    schedule = await get(stub, tenant, made.schedule_id)
    started = [a for a in schedule.recent_actions if a.outcome == "STARTED"]
    assert {a.run_id for a in started} == {r.run_id for r in after}


async def test_cancel_other_cancels_the_running_run(stub: Stub, tenant: str) -> None:
    made = await create(
        stub, tenant, every(1, plan=WAITING, overlap_policy=pb.OVERLAP_POLICY_CANCEL_OTHER)
    )
    found = await wait_runs(stub, tenant, made.schedule_id, 2, 4)
    await pause(stub, tenant, made.schedule_id)
    assert len(found) >= 2
    first = await stub.GetExecution(
        pb.GetExecutionRequest(run_id=found[0].run_id), metadata=md(tenant)
    )
    assert first.execution.status == pb.EXECUTION_STATUS_CANCELLED
    last = (await runs_of(stub, tenant, made.schedule_id))[-1]
    assert last.status in (pb.EXECUTION_STATUS_PENDING, pb.EXECUTION_STATUS_RUNNING)


async def test_a_paused_schedule_makes_no_run_until_unpaused(stub: Stub, tenant: str) -> None:
    made = await create(stub, tenant, every(1, paused=True))
    assert made.paused and not made.next_fire_times
    await asyncio.sleep(2.5)
    assert await runs_of(stub, tenant, made.schedule_id) == []
    response = await stub.UnpauseSchedule(
        pb.UnpauseScheduleRequest(schedule_id=made.schedule_id), metadata=md(tenant)
    )
    assert not response.schedule.paused and response.schedule.next_fire_times
    assert len(await wait_runs(stub, tenant, made.schedule_id, 1, 3)) >= 1


async def test_trigger_runs_now_even_when_paused(stub: Stub, tenant: str) -> None:
    made = await create(stub, tenant, every(3600, paused=True, labels={"k": "v"}))
    response = await stub.TriggerSchedule(
        pb.TriggerScheduleRequest(schedule_id=made.schedule_id), metadata=md(tenant)
    )
    run = response.execution
    assert dict(run.labels) == {"k": "v", "schedule_id": made.schedule_id}
    assert [r.run_id for r in await runs_of(stub, tenant, made.schedule_id)] == [run.run_id]
    schedule = await get(stub, tenant, made.schedule_id)
    assert [(a.outcome, a.run_id) for a in schedule.recent_actions] == [("TRIGGERED", run.run_id)]
    assert schedule.started_count == 1


async def test_restart_inside_the_catchup_window_runs_each_missed_fire_once(
    settings: Settings, tenant: str
) -> None:
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        made = await create(stub, tenant, every(1, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL))
        made.catchup_window.FromSeconds(60)
        await stub.UpdateSchedule(pb.UpdateScheduleRequest(schedule=made), metadata=md(tenant))
        before = await wait_runs(stub, tenant, made.schedule_id, 1, 3)
    down_at = time.time()
    await asyncio.sleep(3.4)  # three fire times (at least) with no server
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        up_at = time.time()
        await asyncio.sleep(0.8)
        await pause(stub, tenant, made.schedule_id)
        found = await runs_of(stub, tenant, made.schedule_id)
    times = [fire_time(r) for r in found]
    missed = [t for t in times if down_at < t <= up_at]
    assert len(missed) >= 3
    assert consecutive(times, 1.0)  # every fire time since the first, each exactly once
    assert times[0] == fire_time(before[0])


async def test_fire_times_beyond_the_catchup_window_are_skipped_and_counted(
    settings: Settings, tenant: str
) -> None:
    schedule = every(1, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
    schedule.catchup_window.FromSeconds(1)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        made = await create(stub, tenant, schedule)
    await asyncio.sleep(4.5)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        await asyncio.sleep(0.5)
        paused = await pause(stub, tenant, made.schedule_id)
        found = await runs_of(stub, tenant, made.schedule_id)
    assert paused.missed_count >= 2
    assert len(found) <= 3  # at most the fire times inside the window and after the start


# ---------------------------------------------------------------- the API


async def test_schedule_crud_and_tenancy(stub: Stub, tenant: str) -> None:
    cron = pb.Schedule(
        schedule_id="nightly",
        cron="0 9 * * 1-5",
        timezone="Europe/Paris",
        executable_plan=echo_plan(),
        overlap_policy=pb.OVERLAP_POLICY_BUFFER_ONE,
    )
    cron.parameters.update({"x": 1})
    made = await create(stub, tenant, cron)
    assert made.plan_hash.startswith("sha256:") and not made.HasField("executable_plan")
    assert made.parameters == cron.parameters
    for stamp in made.next_fire_times:  # 09:00 in Paris is 08:00 UTC in winter
        when = datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC)
        assert (when.hour, when.minute, when.weekday() < 5) == (8, 0, True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, tenant, cron)
    assert details_of(caught.value).reason == "SCHEDULE_ALREADY_EXISTS"

    by_hash = await create(stub, tenant, every(60, "by-hash", plan_hash=made.plan_hash))
    assert by_hash.plan_hash == made.plan_hash
    listed = await stub.ListSchedules(pb.ListSchedulesRequest(page_size=1), metadata=md(tenant))
    assert [s.schedule_id for s in listed.schedules] == ["by-hash"]
    rest = await stub.ListSchedules(
        pb.ListSchedulesRequest(page_token=listed.next_page_token), metadata=md(tenant)
    )
    assert [s.schedule_id for s in rest.schedules] == ["nightly"]

    changed = pb.Schedule()
    changed.CopyFrom(made)
    changed.cron = "30 6 * * *"
    changed.timezone = "UTC"
    updated = (
        await stub.UpdateSchedule(pb.UpdateScheduleRequest(schedule=changed), metadata=md(tenant))
    ).schedule
    when = datetime.fromtimestamp(updated.next_fire_times[0].ToNanoseconds() / 1e9, UTC)
    assert (when.hour, when.minute) == (6, 30)

    other = str(uuid.uuid4())
    for call in (
        stub.GetSchedule(pb.GetScheduleRequest(schedule_id="nightly"), metadata=md(other)),
        stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id="nightly"), metadata=md(other)),
        stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="nightly"), metadata=md(other)),
        stub.Execute(pb.ExecuteRequest(plan_hash=made.plan_hash), metadata=md(other)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (await stub.ListSchedules(pb.ListSchedulesRequest(), metadata=md(other))).schedules

    await stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="nightly"), metadata=md(tenant))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(stub, tenant, "nightly")
    found = details_of(caught.value)
    assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND")


def bad(**fields: Any) -> pb.Schedule:
    interval = fields.pop("interval", None)
    fields.setdefault("schedule_id", "bad")
    schedule = pb.Schedule(executable_plan=echo_plan(), **fields)
    if interval is not None:
        schedule.interval.FromNanoseconds(int(interval * 1e9))
    return schedule


@pytest.mark.parametrize(
    "schedule,field",
    [
        (bad(cron="61 * * * *"), "schedule.cron"),
        (bad(cron="* * * *"), "schedule.cron"),
        (bad(cron="* * * * * *"), "schedule.cron"),
        (bad(cron="0 9 * * *", timezone="Mars/Olympus"), "schedule.timezone"),
        (bad(interval=0.5), "schedule.interval"),
        (bad(), "schedule.interval"),
        (bad(cron="0 9 * * *", interval=60), "schedule.cron"),
        (bad(cron="0 9 * * *", schedule_id="no spaces"), "schedule.schedule_id"),
        (bad(cron="0 9 * * *", overlap_policy=99), "schedule.overlap_policy"),
        (bad(cron="0 9 * * *", labels={"schedule_id": "x"}), "schedule.labels['schedule_id']"),
    ],
)
async def test_a_bad_schedule_is_invalid_argument_naming_the_field(
    stub: Stub, tenant: str, schedule: pb.Schedule, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, tenant, schedule)
    found = details_of(caught.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in found.violations], found.violations


async def test_a_bad_plan_or_unknown_hash_is_refused_at_create(stub: Stub, tenant: str) -> None:
    broken = plan_of({"stepId": "a", "tool": "core.echo", "dependsOn": ["nope"]})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, tenant, every(60, plan=broken))
    found = details_of(caught.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(f.startswith("schedule.executable_plan") for f, _ in found.violations)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, tenant, every(60, plan_hash="sha256:" + "0" * 64))
    assert details_of(caught.value).reason == "PLAN_NOT_FOUND"

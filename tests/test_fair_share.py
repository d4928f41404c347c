"""Fair share of step slots: one tenant's load never stands in front of another's runs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from orchestrator.server.engine.scheduler import ADOPTED_FOR
from orchestrator.server.engine.slots import FairSlots
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running, until
from tests.stores import drop_postgres_database, postgres_database
from tests.test_durability import owners

# ------------------------------------------------------------------ the slot pool itself


async def hold(slots: FairSlots, tenant: str, release: asyncio.Event, got: list[str]) -> None:
    async with slots.take(tenant):
        got.append(tenant)
        await release.wait()


async def test_one_tenant_never_takes_the_reserve() -> None:
    slots = FairSlots(8, reserve=2)
    release = asyncio.Event()
    got: list[str] = []
    tasks = [asyncio.create_task(hold(slots, "a", release, got)) for _ in range(20)]
    await asyncio.sleep(0.01)
    assert slots.held_by("a") == 6 and slots.waiting() == {"a": 14}
    # Another tenant starts at once, from the reserve, with all of a's slots still held.
    late = asyncio.create_task(hold(slots, "b", release, got))
    await asyncio.sleep(0.01)
    assert slots.held_by("b") == 1 and got[-1] == "b"
    release.set()
    await asyncio.gather(*tasks, late)
    assert slots.held == 0 and slots.waiting() == {}


async def test_freed_slots_go_to_the_tenant_holding_least_for_its_weight() -> None:
    slots = FairSlots(6, reserve=1, weight=lambda t: 2.0 if t == "heavy" else 1.0)
    gates = {t: asyncio.Event() for t in ("a", "heavy", "light")}
    got: list[str] = []
    a = [asyncio.create_task(hold(slots, "a", gates["a"], got)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert slots.held_by("a") == 5
    heavy = [asyncio.create_task(hold(slots, "heavy", gates["heavy"], got)) for _ in range(10)]
    light = [asyncio.create_task(hold(slots, "light", gates["light"], got)) for _ in range(10)]
    await asyncio.sleep(0.01)
    gates["a"].set()  # a's five slots turn over; a has nothing more queued
    await asyncio.gather(*a)
    await asyncio.sleep(0.01)
    # Six slots between weights 2 and 1: four and two.
    assert (slots.held_by("heavy"), slots.held_by("light")) == (4, 2)
    gates["heavy"].set()
    gates["light"].set()
    await asyncio.gather(*heavy, *light)
    assert slots.held == 0


async def test_within_a_tenant_priority_then_arrival() -> None:
    slots = FairSlots(2, reserve=1)  # one slot for a single tenant: a strict order
    order: list[str] = []
    gate = asyncio.Event()

    async def one(name: str, priority: int) -> None:
        async with slots.take("t", priority):
            order.append(name)
            await gate.wait() if name == "first" else None

    first = asyncio.create_task(one("first", 3))
    await asyncio.sleep(0.01)
    rest = [
        asyncio.create_task(one(name, p))
        for name, p in (("low", 5), ("mid-1", 3), ("high", 1), ("mid-2", 3))
    ]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *rest)
    assert order == ["first", "high", "mid-1", "mid-2", "low"]


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    slots = FairSlots(2, reserve=0)
    release = asyncio.Event()
    got: list[str] = []
    held = [asyncio.create_task(hold(slots, "a", release, got)) for _ in range(2)]
    waiter = asyncio.create_task(hold(slots, "a", release, got))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await asyncio.gather(*held)
    assert slots.held == 0 and slots.waiting() == {}
    async with slots.take("a"), slots.take("b"):
        assert slots.held == 2


# ------------------------------------------------------------------ through the server


async def test_a_tenant_saturating_every_slot_does_not_delay_another(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, max_steps_in_flight=4)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    slow = plan_of({"stepId": "slow", "tool": "core.wait", "parameters": {"seconds": 60}})
    quick = plan_of({"stepId": "echo", "tool": "core.echo"})
    async with running(settings) as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        backlog = [
            (await stub.Execute(pb.ExecuteRequest(executable_plan=slow), metadata=md(a))).run_id
            for _ in range(12)
        ]
        # Tenant A holds every slot it may (all but the reserve) and has more queued.
        slots = server.engine.slots
        await until(
            lambda: slots.held_by(a) == 3 and slots.waiting() == {a: 9}, 20, "a's slots taken"
        )
        for _ in range(5):
            done = await stub.Execute(
                pb.ExecuteRequest(executable_plan=quick, async_execution=False),
                metadata=md(b),
                timeout=20,  # without fair share: a minute, behind A's waits
            )
            assert done.execution.status == pb.EXECUTION_STATUS_COMPLETED
        assert slots.held_by(a) == 3 and slots.waiting() == {a: 9}
        assert server.metrics is not None
        scraped = generate_latest(server.metrics.registry).decode()
        assert f'orchestrator_steps_waiting{{tenant_id="{a}"}} 9.0' in scraped
        assert "orchestrator_steps_in_flight 3.0" in scraped
        for run_id in backlog:
            await stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(a))


@pytest.mark.postgres
async def test_on_two_replicas_a_saturating_tenant_does_not_delay_another(
    tmp_path: Path,
) -> None:
    url = postgres_database()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    slow = plan_of({"stepId": "slow", "tool": "core.wait", "parameters": {"seconds": 60}})
    quick = plan_of({"stepId": "echo", "tool": "core.echo"})
    try:
        one = make_settings(tmp_path, url, replica_id="one", max_steps_in_flight=4)
        two = make_settings(tmp_path, url, replica_id="two", max_steps_in_flight=4)
        async with (
            running(one) as first,
            running(two) as second,
            grpc.aio.insecure_channel(first.address) as ch1,
            grpc.aio.insecure_channel(second.address) as ch2,
        ):
            stubs = [pb_grpc.OrchestratorServiceStub(ch) for ch in (ch1, ch2)]
            backlog = [
                (
                    await stubs[i % 2].Execute(
                        pb.ExecuteRequest(executable_plan=slow), metadata=md(a)
                    )
                ).run_id
                for i in range(16)
            ]
            # Tenant A holds every slot it may on both replicas, with more claimed or queued.
            engines = [first.engine, second.engine]
            await until(
                lambda: all(e.slots.held_by(a) == 3 for e in engines), 20, "a's slots taken"
            )
            for stub in stubs * 3:
                done = await stub.Execute(
                    pb.ExecuteRequest(executable_plan=quick, async_execution=False),
                    metadata=md(b),
                    timeout=20,  # without fair share: a minute, behind A's waits
                )
                assert done.execution.status == pb.EXECUTION_STATUS_COMPLETED
            assert all(e.slots.held_by(a) == 3 for e in engines)
            for run_id in backlog:
                await stubs[0].Cancel(pb.CancelRequest(run_id=run_id), metadata=md(a))
    finally:
        drop_postgres_database(url)


async def test_claims_take_each_tenants_first_run_before_anyones_second(
    tmp_path: Path, database_url: str
) -> None:
    # The API only: nothing claims the runs but the call below.
    settings = make_settings(tmp_path, database_url, execute=False)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    quick = plan_of({"stepId": "echo", "tool": "core.echo"})
    async with running(settings) as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)

        async def submit(tenant: str, priority: int = 0) -> str:
            request = pb.ExecuteRequest(executable_plan=quick, priority=priority)
            response = await stub.Execute(request, metadata=md(tenant))
            return str(response.run_id)

        backlog = [await submit(a) for _ in range(30)]
        urgent = await submit(a, priority=1)
        lone = await submit(b)
        claimed = await server.engine.journal.claim(lapse=10.0, limit=4)
        # B's one run and A's most urgent first, then A's oldest.
        assert set(claimed) == {lone, urgent, *backlog[:2]}


# ------------------------------------------------------------------ adoption at accept


async def test_a_replica_adopts_what_it_accepts_only_while_slots_are_free(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, max_steps_in_flight=4, execute=False)
    async with running(settings) as server:
        engine = server.engine
        engine.enabled = True  # its adoption book only: nothing is started
        a, b, c = (str(uuid.uuid4()) for _ in range(3))
        # A may hold all but the reserve (3 of 4), counting the runs it was given already.
        assert [engine.adopt(a, f"a{i}") for i in range(4)] == [True, True, True, False]
        assert engine.adopt(b, "b0")  # the reserve is B's
        assert not engine.adopt(c, "c0")  # every slot is spoken for
        engine.settle("a0")  # its first step took a slot, or it was never created
        assert engine.adopt(c, "c1")
        # A run that takes no slot (it waits on a person) stops counting after a while.
        await asyncio.sleep(ADOPTED_FOR + 0.1)
        assert [engine.adopt(a, f"a{i}") for i in range(4, 8)] == [True, True, True, False]


@pytest.mark.postgres
async def test_among_replicas_the_accepting_one_runs_a_run_with_a_free_slot(
    tmp_path: Path,
) -> None:
    url = postgres_database()
    slow = plan_of({"stepId": "slow", "tool": "core.wait", "parameters": {"seconds": 60}})
    tenant = str(uuid.uuid4())
    try:
        one = make_settings(tmp_path, url, replica_id="one", max_steps_in_flight=4)
        two = make_settings(tmp_path, url, replica_id="two", max_steps_in_flight=4)
        async with (
            running(one) as first,
            running(two),
            grpc.aio.insecure_channel(first.address) as ch,
        ):
            stub = pb_grpc.OrchestratorServiceStub(ch)
            run_ids = []
            for _ in range(3):
                response = await stub.Execute(
                    pb.ExecuteRequest(executable_plan=slow), metadata=md(tenant)
                )
                run_ids.append(response.run_id)
                # Owned as it was stored: no claim (and no notice to claim it) between.
                owned = await asyncio.to_thread(owners, url, [response.run_id])
                assert owned == {response.run_id: "one"}
            for run_id in run_ids:
                await stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(tenant))
    finally:
        drop_postgres_database(url)

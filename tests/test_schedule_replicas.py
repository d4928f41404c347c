"""Schedules across real `orchestrator serve` processes (issue 18): two replicas on one
PostgreSQL fire each fire time once, and a replica SIGKILLed as it fires loses no fire time
and doubles none; on SQLite, a server killed as it fires and started again does the same."""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import echo_plan
from tests.stores import drop_postgres_database, fetch, postgres_database
from tests.test_durability import Cluster, call

pytestmark = pytest.mark.subprocess


def every_second(schedule_id: str) -> pb.Schedule:
    schedule = pb.Schedule(
        schedule_id=schedule_id,
        executable_plan=echo_plan(1),
        overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL,
    )
    schedule.interval.FromSeconds(1)
    schedule.catchup_window.FromSeconds(60)
    return schedule


def fire_times(cluster: Cluster, name: str, tenant: str, schedule_id: str) -> list[float]:
    """The fire time of every run of the schedule, oldest first (duplicates kept)."""
    response = call(
        cluster,
        name,
        "ListExecutions",
        pb.ListExecutionsRequest(
            filter=pb.ExecutionFilter(labels={"schedule_id": schedule_id}), page_size=500
        ),
        tenant,
    )
    return sorted(
        datetime.fromisoformat(r.correlation_id.rsplit("/", 1)[-1]).timestamp()
        for r in response.executions
    )


def sleep_until_fire(offset: float) -> None:
    """Sleep until `offset` seconds after the next whole second (a fire time of the
    schedule)."""
    now = time.time()
    time.sleep(int(now) + 1 + offset - now)


def assert_each_fire_once(times: list[float]) -> None:
    assert len(times) == len(set(times)), f"a fire time ran twice: {times}"
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert all(g == 1.0 for g in gaps), f"a fire time was lost: {gaps}"


def kill_as_it_fires(cluster: Cluster, name: str) -> None:
    """SIGKILL the replica a few milliseconds after a fire time: as its clock fires."""
    sleep_until_fire(0.004)
    cluster.procs[name].signal(signal.SIGKILL)
    cluster.procs[name].wait(10)


@pytest.mark.postgres
def test_two_replicas_fire_each_time_once_and_a_kill_loses_none(tmp_path: Path) -> None:
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("A", lease=2)
        cluster.start("B", lease=2)
        call(
            cluster,
            "A",
            "CreateSchedule",
            pb.CreateScheduleRequest(schedule=every_second("both")),
            tenant,
        )
        time.sleep(4.5)
        assert_each_fire_once(fire_times(cluster, "B", tenant, "both"))
        for _ in range(3):
            kill_as_it_fires(cluster, "A")
            time.sleep(1.3)  # B alone for a fire time
            cluster.start("A", lease=2)
            kill_as_it_fires(cluster, "B")
            time.sleep(1.3)
            cluster.start("B", lease=2)
        time.sleep(2.5)
        call(cluster, "A", "PauseSchedule", pb.PauseScheduleRequest(schedule_id="both"), tenant)
        time.sleep(0.5)
        times = fire_times(cluster, "A", tenant, "both")
        assert len(times) >= 14
        assert_each_fire_once(times)
        # The claims agree with the runs: one STARTED fire row per run.
        claims = fetch(
            url,
            "SELECT count(*) AS n FROM schedule_fires WHERE schedule_id = 'both' "
            "AND outcome = 'STARTED'",
        )
        assert claims[0]["n"] == len(times)
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


def test_a_server_killed_as_it_fires_runs_each_fire_time_once_after_restart(
    tmp_path: Path,
) -> None:
    cluster = Cluster(f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}", tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("solo")
        call(
            cluster,
            "solo",
            "CreateSchedule",
            pb.CreateScheduleRequest(schedule=every_second("solo")),
            tenant,
        )
        time.sleep(2.5)
        for _ in range(3):
            kill_as_it_fires(cluster, "solo")
            time.sleep(1.2)
            cluster.start("solo")
            time.sleep(1.0)
        call(cluster, "solo", "PauseSchedule", pb.PauseScheduleRequest(schedule_id="solo"), tenant)
        times = fire_times(cluster, "solo", tenant, "solo")
        assert len(times) >= 8
        assert_each_fire_once(times)
    finally:
        cluster.stop_all()

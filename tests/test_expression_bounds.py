"""Issue 20's acceptance: one tenant's expressions never freeze the server.

A hostile tenant submits the worst expressions each limit allows over the largest data a
request may carry (bench/expressions.py, `hostile_load`), while another tenant calls
GetExecution and health every 50 ms on the same real server, in a process of its own: every
hostile step must fail "too costly" (or complete within the budget) and no bystander call may
wait long.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.expressions import hostile_load
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import sqlite_url
from tests.process import ServeProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    # A process of its own: the test's client threads must not share the server's GIL.
    server = ServeProcess(sqlite_url(tmp_path / "orchestrator.db"), tmp_path / "server.log")
    try:
        server.wait_serving()
        yield server
    finally:
        server.kill()


@pytest.mark.subprocess
def test_hostile_expressions_never_hold_up_another_tenant(server: ServeProcess) -> None:
    load = hostile_load(server.address)
    for name, step in load.steps.items():
        assert step.status in (pb.STEP_STATUS_FAILED, pb.STEP_STATUS_COMPLETED), (name, step)
        if step.status == pb.STEP_STATUS_FAILED:
            assert "too costly" in step.error, (name, step.error)
    assert len(load.latencies) > 20
    slowest = max(load.latencies, key=lambda item: item[1])
    ordered = sorted(seconds for _, seconds in load.latencies)
    p95 = ordered[int(len(ordered) * 0.95)]
    print(
        f"bystander calls: p95 {p95 * 1000:.0f} ms, slowest {slowest[0]} {slowest[1] * 1000:.0f} ms"
    )
    # The bar for every call is 100 ms, and `make bench` reports the slowest against it. A
    # test on a shared machine (CI runs the server, its sandbox and this client on two cores)
    # can be descheduled for longer than that, so it asserts what a freeze would break: 95%
    # of calls within the bar and none near a second. Before the bounds, one such condition
    # held every call for 19 s.
    assert p95 < 0.100, f"p95 {p95 * 1000:.0f} ms"
    assert slowest[1] < 1.0, f"{slowest[0]} took {slowest[1] * 1000:.0f} ms"

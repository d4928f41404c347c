"""Gaps a platform team found by trying (issue 17): each closed, each shown here.

No test here sends a packet off this machine: the outbound policy is asked about address
literals (resolving a literal is local), and every call goes to loopback."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import time
import tracemalloc
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from orchestrator.server.security import ExecuteRateLimiter
from orchestrator.server.tools.network import parse_networks, resolve_allowed
from orchestrator.server.tools.registry import ToolError
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.errors import details_of

# ---------------------------------------------------------------- outbound address policy

REFUSED = [
    "100.64.0.1",  # carrier-grade NAT
    "100.100.100.200",  # a cloud's metadata service, inside 100.64.0.0/10
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::6440:1",  # NAT64 of 100.64.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "::ffff:169.254.169.254",  # IPv4-mapped metadata
    "::ffff:a9fe:a9fe",  # the same, written in hex
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:100.64.0.1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "169.254.169.254",
    "10.1.2.3",
    "192.168.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "198.18.0.1",  # benchmarking
    "224.0.0.1",
    "::1",
    "fd00::1",
    "fe80::1",
]
ALLOWED = [
    "8.8.8.8",
    "2001:4860:4860::8888",
    "64:ff9b::808:808",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", REFUSED)
async def test_address_policy_refuses(address: str) -> None:
    with pytest.raises(ToolError) as info:
        await resolve_allowed(address, 80, ())
    assert info.value.reason == "DESTINATION_NOT_ALLOWED"
    assert not info.value.retryable


async def test_address_policy_lets_public_addresses_and_allowed_networks_through() -> None:
    for address in ALLOWED:
        assert ipaddress.ip_address(await resolve_allowed(address, 80, ())) == ipaddress.ip_address(
            address
        )
    allow = parse_networks("100.64.0.0/10, 169.254.169.254/32")
    assert await resolve_allowed("100.64.0.1", 80, allow) == "100.64.0.1"
    # An allowed IPv4 network also allows the IPv6 forms that lead to it.
    assert await resolve_allowed("64:ff9b::a9fe:a9fe", 80, allow) == "64:ff9b::a9fe:a9fe"
    with pytest.raises(ToolError):
        await resolve_allowed("64:ff9b::a00:1", 80, allow)


# ---------------------------------------------------------------- rate limiter memory


def test_rate_limiter_memory_is_bounded_for_100000_tenants() -> None:
    limiter = ExecuteRateLimiter(rate=1, burst=2, max_tenants=10_000)
    now = time.monotonic()
    tracemalloc.start()
    try:
        for i in range(20_000):
            limiter.take(str(uuid.UUID(int=i)), now)
        warm, _ = tracemalloc.get_traced_memory()
        for i in range(20_000, 100_000):
            limiter.take(str(uuid.UUID(int=i)), now)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) == 10_000
    # 80,000 more tenants seen, no more memory held (buckets are about 200 bytes each).
    assert after - warm < 200_000, after - warm


def test_rate_limiter_still_limits_a_busy_tenant_among_many() -> None:
    limiter = ExecuteRateLimiter(rate=1, burst=2, max_tenants=100)
    now = 1000.0
    busy = str(uuid.uuid4())
    assert limiter.take(busy, now) == 0 and limiter.take(busy, now) == 0
    for i in range(99):  # fewer than the bound: the busy tenant's bucket stays
        limiter.take(str(uuid.UUID(int=i)), now)
    assert limiter.take(busy, now) == pytest.approx(1.0)
    # Once the bucket has had time to refill, dropping it loses nothing.
    for i in range(1000):
        limiter.take(str(uuid.UUID(int=10_000 + i)), now + 3)
    assert len(limiter) == 100
    assert limiter.take(busy, now + 3) == 0


# ---------------------------------------------------------------- watch limit under a flood


async def test_every_stream_above_the_watch_limit_gets_watch_limit(tmp_path: Path) -> None:
    limit, extra = 20, 2000
    tenant = str(uuid.uuid4())
    settings = make_settings(tmp_path, max_watchers_per_tenant=limit)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        ask = plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}})
        run_id = (
            await stub.Execute(pb.ExecuteRequest(executable_plan=ask), metadata=md(tenant))
        ).run_id
        calls = [
            stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
            for _ in range(limit + extra)
        ]

        async def first(
            call: grpc.aio.UnaryStreamCall[pb.WatchExecutionRequest, pb.WatchExecutionResponse],
        ) -> str:
            try:
                await call.read()
                return "OK"
            except grpc.aio.AioRpcError as err:
                d = details_of(err)
                return f"{d.code.name} {d.reason}"

        try:
            outcomes = collections.Counter(await asyncio.gather(*(first(c) for c in calls)))
        finally:
            for call in calls:
                call.cancel()
    assert outcomes == {"OK": limit, "RESOURCE_EXHAUSTED WATCH_LIMIT": extra}


# ---------------------------------------------------------------- connection age


async def test_connections_are_recycled_after_their_max_age(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_connection_age_seconds=0.5)
    tenant = str(uuid.uuid4())
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))
        assert ch.get_state() is grpc.ChannelConnectivity.READY
        # GOAWAY after the age: with no call in flight the channel drops to IDLE, and the
        # next call connects afresh (behind an L4 balancer: maybe to another replica).
        deadline = time.monotonic() + 10
        while ch.get_state() is grpc.ChannelConnectivity.READY:
            assert time.monotonic() < deadline, "the connection was never recycled"
            await asyncio.sleep(0.1)
        await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))


# ---------------------------------------------------------------- idempotency levels


def test_reads_are_marked_no_side_effects() -> None:
    """Get and List say so in the contract, so proxies and clients may retry them."""
    service = pb.DESCRIPTOR.services_by_name["OrchestratorService"]
    for method in service.methods:
        level = method.GetOptions().idempotency_level
        if method.name.startswith(("Get", "List")):
            assert level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, method.name
        else:
            assert level == descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN, method.name

"""The interceptor on grpc-interceptor's base: an error raised after a stream's first message
is answered like one raised before it (precise code and details), on a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from orchestrator.server.api.interceptors import CallInterceptor
from orchestrator.server.errors import NotFound
from orchestrator.server.metrics import Metrics
from tests.errors import details_of

SERVICE = "test.Probe"


async def drip(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    yield b"first"
    if request == b"domain":
        raise NotFound("the run went away", metadata={"run_id": "r-1"})
    raise RuntimeError("a bug with a secret in it")


async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise NotFound("no such run")


@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, Metrics]]:
    metrics = Metrics()
    server = grpc.aio.server(interceptors=[CallInterceptor(metrics)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Drip": grpc.unary_stream_rpc_method_handler(drip),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch, metrics
    finally:
        await server.stop(0)


async def test_errors_mid_stream_keep_their_code_and_details(
    channel: tuple[grpc.aio.Channel, Metrics],
) -> None:
    ch, metrics = channel
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(f"/{SERVICE}/Drip")
    call = stream(b"domain")
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    d = details_of(info.value)
    assert (d.code, d.reason, d.metadata["run_id"]) == (
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
        "r-1",
    )
    assert d.metadata["correlation_id"]

    call = stream(b"bug")
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    d = details_of(info.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR")
    assert "secret" not in d.message

    with pytest.raises(grpc.aio.AioRpcError) as info:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(f"/{SERVICE}/Fail")
        await unary(b"")
    assert details_of(info.value).reason == "EXECUTION_NOT_FOUND"

    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for family in metrics.registry.collect()
        if family.name == "grpc_server_handled"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert handled == {("Drip", "NOT_FOUND"): 1, ("Drip", "INTERNAL"): 1, ("Fail", "NOT_FOUND"): 1}

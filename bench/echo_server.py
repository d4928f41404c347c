"""The ceiling: a trivial grpc.aio server with our server's gRPC options and nothing else.

`python -m bench.echo_server --port N`. Methods take and return raw bytes (no message
classes): Unary echoes; Stream sends `count` copies of a payload; Subscribe streams what
Publish broadcasts (8-byte publish time + payload), one queue per subscriber, until a
publication with `end` set.

It also serves `orchestrator.v1.OrchestratorService/Execute` as a floor: the request parsed,
the `x-correlation-id` initial metadata the contract requires (DESIGN §6) sent, a run id
answered, and nothing else done (no tenant, no validation, no store).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator.server.app import SERVER_OPTIONS
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb

SERVICE = "bench.Echo"
# Publish body: 1 byte end flag + payload. Stream body: 4-byte count + 4-byte size.
HEADER = struct.Struct("<d")


class Echo:
    """Unary echo, server streaming, and a broadcast to every subscriber."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()
        self.joined = 0

    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def Stream(self, request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        count, size = struct.unpack("<II", request[:8])
        payload = b"x" * size
        for _ in range(count):
            yield payload

    async def Subscribe(self, request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.subscribers.add(queue)
        self.joined += 1
        try:
            yield HEADER.pack(0.0)  # "connected"
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self.subscribers.discard(queue)

    async def Publish(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        end, payload = request[:1] == b"\x01", request[1:]
        message = HEADER.pack(time.time()) + payload  # one object for every subscriber
        for queue in self.subscribers:
            queue.put_nowait(message)
            if end:
                queue.put_nowait(None)
        return struct.pack("<I", len(self.subscribers))


async def execute_floor(
    request: pb.ExecuteRequest, context: grpc.aio.ServicerContext
) -> pb.ExecuteResponse:
    """What any Execute costs before it does anything: see the module's docstring."""
    await context.send_initial_metadata((("x-correlation-id", str(uuid.uuid4())),))
    return pb.ExecuteResponse(run_id=str(uuid.uuid4()))


async def main(port: int) -> None:
    server = grpc.aio.server(
        options=[
            *SERVER_OPTIONS,
            ("grpc.max_receive_message_length", Settings().max_request_bytes),
        ]
    )
    echo = Echo()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.Unary),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.Stream),
        "Subscribe": grpc.unary_stream_rpc_method_handler(echo.Subscribe),
        "Publish": grpc.unary_unary_rpc_method_handler(echo.Publish),
    }
    floor = grpc.unary_unary_rpc_method_handler(
        execute_floor,
        request_deserializer=pb.ExecuteRequest.FromString,
        response_serializer=pb.ExecuteResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(
                "orchestrator.v1.OrchestratorService", {"Execute": floor}
            ),
        )
    )
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await status.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))

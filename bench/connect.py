"""The HTTP port against the gRPC port of the same server: GetExecution over Connect (binary
and JSON, keep-alive HTTP/1.1, as a browser calls it) against gRPC, serial p50; and the watch
fan-out (bench/watch_fanout.py's run and cadence) with N Connect streams against N gRPC
streams. Targets: Connect within 2x of gRPC for both."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from bench.common import CEILINGS, Figure, echo_plan, free_port, percentile, record, serve, summary
from bench.watch_fanout import MODES, Stream, fanout
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

PREFIX = "/orchestrator.v1.OrchestratorService/"


class Http1:
    """One keep-alive HTTP/1.1 connection with the least client work per call: a browser's
    fetch is native code, and httpx's own Python per call would be measured instead of the
    server (the client shares the machine's two cores with it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: str) -> Http1:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    def send(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n{head}\r\n"
        )
        self.writer.write(request.encode() + body)

    async def status(self) -> int:
        """The status line and headers; the body follows, chunked."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower(), head
        return int(head.split(b" ", 2)[1])

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    async def call(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        self.send(path, body, headers)
        status = await self.status()
        data = b"".join([c async for c in self.chunks()])
        assert status == 200, data
        return data

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def _serial(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


async def unary(address: str, http_address: str, calls: int) -> dict[str, list[float]]:
    """Serial GetExecution of one finished run over gRPC, Connect binary and Connect JSON,
    in interleaved rounds so that drift on a shared machine hits the three alike."""
    tenant = str(uuid.uuid4())
    md = (("x-tenant-id", tenant),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        run = await stub.Execute(pb.ExecuteRequest(executable_plan=echo_plan(3)), metadata=md)
        request = pb.GetExecutionRequest(run_id=run.run_id)
        for _ in range(600):
            got = await stub.GetExecution(request, metadata=md)
            if got.execution.status == pb.EXECUTION_STATUS_COMPLETED:
                break
            await asyncio.sleep(0.05)
        binary = request.SerializeToString()
        as_json = json.dumps({"runId": run.run_id}).encode()
        path = PREFIX + "GetExecution"
        http = await Http1.open(http_address)

        async def over_grpc() -> object:
            return await stub.GetExecution(request, metadata=md)

        async def over_connect() -> object:
            kind = {"x-tenant-id": tenant, "content-type": "application/proto"}
            return await http.call(path, binary, kind)

        async def over_json() -> object:
            kind = {"x-tenant-id": tenant, "content-type": "application/json"}
            return await http.call(path, as_json, kind)

        calls_by = {"grpc": over_grpc, "connect": over_connect, "json": over_json}
        results: dict[str, list[float]] = {name: [] for name in calls_by}
        for fn in calls_by.values():
            await _serial(fn, max(calls // 10, 20))  # warm up
        for _ in range(5):
            for name, fn in calls_by.items():
                results[name] += await _serial(fn, calls // 5)
        await http.close()
        return results


def connect_stream(http_address: str) -> Stream:
    """Watcher i's WatchExecution over Connect (binary envelopes), each on its own
    connection as a browser tab's, decoded as it arrives."""

    async def open_stream(
        i: int, run_id: str, md: tuple[tuple[str, str], ...]
    ) -> AsyncIterator[pb.WatchExecutionResponse]:
        payload = pb.WatchExecutionRequest(run_id=run_id).SerializeToString()
        http = await Http1.open(http_address)
        headers = {**dict(md), "content-type": "application/connect+proto"}
        http.send(PREFIX + "WatchExecution", struct.pack(">BI", 0, len(payload)) + payload, headers)
        assert await http.status() == 200
        buffer = b""
        try:
            async for chunk in http.chunks():
                buffer += chunk
                while len(buffer) >= 5:
                    flags, size = struct.unpack(">BI", buffer[:5])
                    if len(buffer) < 5 + size:
                        break
                    frame, buffer = buffer[5 : 5 + size], buffer[5 + size :]
                    if flags & 0x02:
                        return  # end of stream
                    yield pb.WatchExecutionResponse.FromString(frame)
        finally:
            await http.close()

    return open_stream


def _peer(key: str, name: str, value: float) -> None:
    """A gRPC figure of this run, as the peer its Connect figure is compared with."""
    CEILINGS[key] = Figure(name, value, "ms")


def run(calls: int = 2000, watchers: int = 200, steps: int = 10) -> None:
    print(f"== the HTTP port: Connect against gRPC ({calls} calls, {watchers} streams)")
    http_port = free_port()
    env = {"ORCHESTRATOR_MAX_WATCHERS_PER_TENANT": str(2 * watchers + 10)}
    with serve(None, "--http-port", str(http_port), **env) as (address, _pid):
        http_address = f"127.0.0.1:{http_port}"
        got = asyncio.run(unary(address, http_address, calls))
        for name in ("grpc", "connect", "json"):
            print(f"  GetExecution over {name}: {summary(got[name])}")
        grpc_p50 = percentile(got["grpc"], 0.5)
        connect_p50 = percentile(got["connect"], 0.5)
        _peer("peer_grpc_get_p50", "GetExecution gRPC p50", grpc_p50)
        record(
            Figure(
                "GetExecution Connect p50",
                connect_p50,
                "ms",
                ceiling="peer_grpc_get_p50",
                target="≤ 2 x gRPC",
                met=connect_p50 <= 2 * grpc_p50,
            )
        )
        json_p50 = percentile(got["json"], 0.5)
        record(Figure("GetExecution Connect JSON p50", json_p50, "ms", ceiling="peer_grpc_get_p50"))

        seconds = MODES["paced"]
        print(f"  fan-out: {watchers} streams, {steps} steps of core.wait {seconds} s")
        over_grpc = asyncio.run(fanout(address, watchers, steps, seconds=seconds))
        over_connect = asyncio.run(
            fanout(
                address, watchers, steps, seconds=seconds, open_stream=connect_stream(http_address)
            )
        )
        _peer("peer_grpc_fanout_p99", f"fan-out {watchers} gRPC p99", over_grpc["p99"])
        record(
            Figure(
                f"fan-out {watchers} Connect p99",
                over_connect["p99"],
                "ms",
                ceiling="peer_grpc_fanout_p99",
                target="≤ 2 x gRPC",
                met=over_connect["p99"] <= 2 * over_grpc["p99"],
            )
        )

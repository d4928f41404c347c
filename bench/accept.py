"""Accept throughput: `Execute` of a 3-step core.echo plan, 64 callers over 4 channels, each
caller its own tenant. Measured API-only (`--no-execute`: only the durable accept path) and
with execution on. The run is committed before the response leaves the server."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from bench.common import (
    Figure,
    Load,
    ceiling,
    channels,
    closed_loop,
    echo_plan,
    md,
    record,
    serve,
    tenants,
)
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc


@dataclass
class Scale:
    seconds: float = 10.0
    callers: int = 64

    @classmethod
    def quick(cls) -> Scale:
        return cls(seconds=4.0)


async def accept_load(address: str, pid: int, callers: int, seconds: float) -> Load:
    chans = channels(address, 4)
    stubs = [pb_grpc.OrchestratorServiceStub(c) for c in chans]
    request = pb.ExecuteRequest(executable_plan=echo_plan())
    metadata = [md(t) for t in tenants(callers)]

    def call(i: int) -> object:
        return stubs[i % len(stubs)].Execute(request, metadata=metadata[i], timeout=30)

    try:
        return await closed_loop(call, callers, seconds, pid=pid)
    finally:
        for c in chans:
            await c.close()


def run(scale: Scale) -> None:
    print(f"== accept: Execute of a 3-step plan, {scale.callers} callers over 4 channels")
    for label, execute in (("API-only", "false"), ("executing", "true")):
        with serve(ORCHESTRATOR_EXECUTE=execute) as (address, pid):
            load = asyncio.run(accept_load(address, pid, scale.callers, scale.seconds))
        print(f"  {label}: {load.describe('runs')}")
        share = load.rate / (ceiling("echo_unary") or float("nan"))
        record(
            Figure(
                f"accept runs/s ({label})",
                load.rate,
                "runs/s",
                ceiling="echo_unary",
                target="≥ 0.50 x echo" if label == "API-only" else "",
                met=share >= 0.5 if label == "API-only" and share == share else None,
            )
        )
        if label == "API-only":
            # The same against an Execute that does nothing but what the contract requires
            # of every answer (bench/echo_server.py): what the durable accept itself costs.
            record(
                Figure(
                    "accept runs/s (API-only), of the floor", load.rate, "runs/s", "execute_floor"
                )
            )
            record(
                Figure("accept p99 (API-only), of the floor", load.p99, "ms", "execute_floor_p99")
            )
        record(Figure(f"accept p50 ({label})", load.p50, "ms", ceiling="echo_unary_p50"))
        record(
            Figure(
                f"accept p99 ({label})",
                load.p99,
                "ms",
                ceiling="echo_unary_p99",
                target="< 100 ms",
                met=load.p99 < 0.1,
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale()
    if args.seconds:
        scale.seconds = args.seconds
    run(scale)


if __name__ == "__main__":
    main()

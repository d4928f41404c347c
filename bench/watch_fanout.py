"""Watch fan-out: N watchers on one run; commit-to-delivery latency and events/s delivered."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from bench.common import Figure, Window, record, serve, summary
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

# Opens watcher i's WatchExecution stream on a run, with the call's metadata.
Stream = Callable[[int, str, tuple[tuple[str, str], ...]], AsyncIterator[pb.WatchExecutionResponse]]


def plan(steps: int, seconds: float) -> pb.ExecutablePlan:
    p = pb.ExecutablePlan(plan_id="fanout")
    flow = p.flows.add(flow_id="main")
    for i in range(steps):
        step = flow.steps.add(step_id=f"s{i}", tool="core.wait")
        step.parameters.update({"seconds": seconds})
    p.security_context.allowed_tools.append("core.wait")
    return p


async def fanout(
    address: str,
    watchers: int,
    steps: int,
    channels: int = 4,
    seconds: float = 0.05,
    on_ready: Callable[[], object] | None = None,
    open_stream: Stream | None = None,
) -> dict[str, float]:
    """Connect `watchers` streams to a run gated on a clarification, answer it, and time
    each event from its commit to each watcher. `on_ready` runs once all are connected.
    `open_stream(i, run_id, metadata)` opens watcher i's stream (default: gRPC, over
    `channels` channels; bench/connect.py passes Connect's)."""
    tenant = str(uuid.uuid4())
    md = (("x-tenant-id", tenant),)
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [pb_grpc.OrchestratorServiceStub(c) for c in chans]
    # A run that waits for a person first, so every watcher is connected before events flow.
    p = plan(steps, seconds)
    gate = p.flows[0].steps.add(step_id="gate", tool="core.clarify")
    gate.parameters.update({"prompt": "go"})
    for s in p.flows[0].steps[:-1]:
        s.depends_on.append("gate")
    p.flows[0].parallel_execution = False
    p.flows[0].steps.insert(0, p.flows[0].steps.pop())
    p.security_context.allowed_tools.append("core.clarify")
    run = await stubs[0].Execute(pb.ExecuteRequest(executable_plan=p), metadata=md)
    latencies: list[float] = []
    received = 0
    first_at = last_at = 0.0
    ready = asyncio.Event()
    connected = 0

    async def watch(i: int) -> None:
        nonlocal received, first_at, last_at, connected
        if open_stream is None:
            call: AsyncIterator[pb.WatchExecutionResponse] = stubs[i % channels].WatchExecution(
                pb.WatchExecutionRequest(run_id=run.run_id), metadata=md
            )
        else:
            call = open_stream(i, run.run_id, md)
        async for item in call:
            now = time.time()
            event = item.event
            if event.type == pb.EVENT_TYPE_SNAPSHOT:
                connected += 1
                if connected == watchers:
                    ready.set()
                continue
            if event.type == pb.EVENT_TYPE_HEARTBEAT:
                continue
            received += 1
            first_at = first_at or now
            last_at = now
            latencies.append(now - event.timestamp.ToNanoseconds() / 1e9)

    tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
    await asyncio.wait_for(ready.wait(), 120)
    if on_ready is not None:
        on_ready()
    snapshot = await stubs[0].GetExecution(pb.GetExecutionRequest(run_id=run.run_id), metadata=md)
    while not snapshot.execution.pending_clarifications:
        await asyncio.sleep(0.05)
        snapshot = await stubs[0].GetExecution(
            pb.GetExecutionRequest(run_id=run.run_id), metadata=md
        )
    clar = snapshot.execution.pending_clarifications[0]
    from google.protobuf import struct_pb2

    await stubs[0].RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run.run_id,
            clarification_id=clar.clarification_id,
            response=struct_pb2.Value(string_value="go"),
        ),
        metadata=md,
    )
    await asyncio.wait_for(asyncio.gather(*tasks), 600)
    for c in chans:
        await c.close()
    span = max(last_at - first_at, 1e-9)
    print(
        f"watch fan-out: {watchers} watchers, {received // watchers} events each, "
        f"{received} deliveries"
    )
    print(f"  commit-to-delivery: {summary(latencies)}")
    print(f"  delivered: {received / span:,.0f} events/s over {span:.2f} s")
    ordered = sorted(latencies)
    return {
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[int(0.99 * len(ordered))],
        "rate": received / span,
    }


MODES = {
    # Each step waits, so its "started" and "completed" events are that far apart: "paced"
    # fans each event out alone; "burst" sends them faster than 1,000 streams can take them.
    # bench/ceilings.py publishes on the echo server at the same cadence.
    "paced": 0.3,
    "burst": 0.05,
}


def run(watchers: int = 1000, paced_steps: int = 10, burst_steps: int = 30) -> None:
    print(f"== watch fan-out: {watchers} watchers on one run")
    env = {"ORCHESTRATOR_MAX_WATCHERS_PER_TENANT": str(watchers + 10)}
    for mode, steps in (("paced", paced_steps), ("burst", burst_steps)):
        print(f"  {mode}: {steps} steps of core.wait {MODES[mode]} s")
        with serve(**env) as (address, pid):
            window = Window(pid)
            got = asyncio.run(fanout(address, watchers, steps, seconds=MODES[mode]))
            print(f"    {window.describe()}")
        record(Figure(f"fan-out {mode} p50", got["p50"], "ms", ceiling=f"echo_fanout_{mode}_p50"))
        record(
            Figure(
                f"fan-out {mode} p99",
                got["p99"],
                "ms",
                ceiling=f"echo_fanout_{mode}_p99",
                target="≤ 1.5 x echo",
                met=_within(got["p99"], f"echo_fanout_{mode}_p99", 1.5),
            )
        )
        record(
            Figure(
                f"fan-out {mode} events/s",
                got["rate"],
                "msgs/s",
                ceiling=f"echo_fanout_{mode}_rate",
            )
        )


def _within(value: float, key: str, factor: float) -> bool | None:
    from bench.common import ceiling

    base = ceiling(key)
    return None if base is None else value <= factor * base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=0.05, help="core.wait of each step")
    args = parser.parse_args(argv)
    with serve(ORCHESTRATOR_MAX_WATCHERS_PER_TENANT=str(args.watchers + 10)) as (address, _pid):
        asyncio.run(fanout(address, args.watchers, args.steps, seconds=args.seconds))


if __name__ == "__main__":
    main()

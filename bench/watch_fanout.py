"""Watch fan-out: N watchers on one run; commit-to-delivery latency and events/s delivered."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import grpc

from bench.common import serve, summary
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc


def plan(steps: int, seconds: float) -> pb.ExecutablePlan:
    p = pb.ExecutablePlan(plan_id="fanout")
    flow = p.flows.add(flow_id="main")
    for i in range(steps):
        step = flow.steps.add(step_id=f"s{i}", tool="core.wait")
        step.parameters.update({"seconds": seconds})
    p.security_context.allowed_tools.append("core.wait")
    return p


async def fanout(address: str, watchers: int, steps: int, channels: int = 4) -> dict[str, float]:
    tenant = str(uuid.uuid4())
    md = (("x-tenant-id", tenant),)
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [pb_grpc.OrchestratorServiceStub(c) for c in chans]
    # A run that waits for a person first, so every watcher is connected before events flow.
    p = plan(steps, 0.05)
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
        call = stubs[i % channels].WatchExecution(
            pb.WatchExecutionRequest(run_id=run.run_id), metadata=md
        )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    with serve(ORCHESTRATOR_MAX_WATCHERS_PER_TENANT=str(args.watchers + 10)) as (address, _pid):
        asyncio.run(fanout(address, args.watchers, args.steps))


if __name__ == "__main__":
    main()

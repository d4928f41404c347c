"""The Orchestrator client library (async and sync) and the `orchestrator` CLI.

```python
from orchestrator.client import OrchestratorClient, event_type_name, results

async with OrchestratorClient("127.0.0.1:50051", tenant) as client:
    run = await client.execute("plan.json", parameters={"name": "ada"})
    async for event in client.watch(run.run_id):
        print(event.sequence, event_type_name(event.type), event.step_id)
    print(results(await client.wait(run.run_id)))
```
"""

from __future__ import annotations

from orchestrator.client.aio import OrchestratorClient
from orchestrator.client.connection import DEFAULT_ADDRESS, Connection
from orchestrator.client.errors import (
    EXCEPTION_BY_CODE,
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OrchestratorError,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from orchestrator.client.messages import (
    TERMINAL,
    PlanError,
    event_type_name,
    is_terminal_event,
    load_plan,
    outputs,
    plain,
    results,
    status_name,
    step_status_name,
)
from orchestrator.client.sync import SyncOrchestratorClient

__all__ = [
    "DEFAULT_ADDRESS",
    "EXCEPTION_BY_CODE",
    "TERMINAL",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Connection",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OrchestratorClient",
    "OrchestratorError",
    "OutOfRange",
    "PermissionDenied",
    "PlanError",
    "ResourceExhausted",
    "SyncOrchestratorClient",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "event_type_name",
    "is_terminal_event",
    "load_plan",
    "outputs",
    "plain",
    "results",
    "status_name",
    "step_status_name",
]

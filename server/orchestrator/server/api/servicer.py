"""OrchestratorService: translates proto requests into control-plane calls, nothing more."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from orchestrator.server.api.interceptors import call_correlation_id, call_tenant
from orchestrator.server.control import ControlPlane, transition_response
from orchestrator.server.lifecycle import Action
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    """The orchestrator.v1.OrchestratorService RPCs."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    async def Execute(self, request: pb.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        """Validate and store a run."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        response = await self._control.execute(
            call_tenant(), call_correlation_id(), request, call_deadline=deadline
        )
        structlog.contextvars.bind_contextvars(run_id=response.run_id)
        return response

    async def GetExecution(
        self, request: pb.GetExecutionRequest, context: Context
    ) -> pb.GetExecutionResponse:
        """One run's snapshot."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        return pb.GetExecutionResponse(
            execution=await self._control.get(call_tenant(), request.run_id)
        )

    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Context
    ) -> pb.ListExecutionsResponse:
        """A page of the tenant's runs."""
        return await self._control.list(call_tenant(), request)

    async def Pause(self, request: pb.PauseRequest, context: Context) -> pb.PauseResponse:
        """Pause a run."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        result = await self._control.control(
            call_tenant(), request.run_id, Action.PAUSE, request.reason
        )
        return pb.PauseResponse(**transition_response(result, "paused"))

    async def Resume(self, request: pb.ResumeRequest, context: Context) -> pb.ResumeResponse:
        """Resume a paused run."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        result = await self._control.control(
            call_tenant(), request.run_id, Action.RESUME, request.reason
        )
        return pb.ResumeResponse(**transition_response(result, "resumed"))

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        """Cancel a run."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        result = await self._control.control(
            call_tenant(), request.run_id, Action.CANCEL, request.reason
        )
        return pb.CancelResponse(**transition_response(result, "cancelled"))

    async def RespondToClarification(
        self, request: pb.RespondToClarificationRequest, context: Context
    ) -> pb.RespondToClarificationResponse:
        """Answer a pending clarification."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        execution = await self._control.respond(call_tenant(), request)
        return pb.RespondToClarificationResponse(execution=execution)

    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[pb.WatchExecutionResponse]:
        """Stream one run's events."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        async for event in self._control.watch(call_tenant(), request):
            yield pb.WatchExecutionResponse(event=event)

    async def WatchExecutions(
        self, request: pb.WatchExecutionsRequest, context: Context
    ) -> AsyncIterator[pb.WatchExecutionsResponse]:
        """Stream the tenant's run status changes."""
        async for cursor, event in self._control.watch_all(call_tenant(), request):
            yield pb.WatchExecutionsResponse(cursor=cursor, event=event)

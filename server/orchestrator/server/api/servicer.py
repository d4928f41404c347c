"""OrchestratorService: translates proto requests into control-plane calls, nothing more."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from orchestrator.server.api.interceptors import call_correlation_id, call_tenant, decoder
from orchestrator.server.control import ControlPlane, transition_response
from orchestrator.server.lifecycle import Action
from orchestrator.v1 import orchestrator_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class OrchestratorServicer:
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

    async def RetryExecution(
        self, request: pb.RetryExecutionRequest, context: Context
    ) -> pb.RetryExecutionResponse:
        """Send a failed, cancelled (or, from named steps, completed) run back to RUNNING."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        execution = await self._control.retry(call_tenant(), request)
        return pb.RetryExecutionResponse(execution=execution)

    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Stream one run's events (frames arrive serialized: see `register`)."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        async for frame in self._control.watch(call_tenant(), request):
            yield frame

    async def WatchExecutions(
        self, request: pb.WatchExecutionsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Stream the tenant's run status changes (frames arrive serialized)."""
        async for frame in self._control.watch_all(call_tenant(), request):
            yield frame


def message_class(full_name: str) -> Any:
    return getattr(pb, full_name.rsplit(".", 1)[-1])


def _serialize(message: Any) -> bytes:
    # Watch streams yield frames serialized once for all their watchers; the rest are messages.
    return message if isinstance(message, bytes) else message.SerializeToString()


def register(servicer: OrchestratorServicer, server: grpc.aio.Server) -> None:
    """Add the service to `server`, like the generated `add_..._to_server`, but with a response
    serializer that passes pre-serialized stream frames through untouched."""
    service = pb.DESCRIPTOR.services_by_name["OrchestratorService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=decoder(message_class(method.input_type.full_name)),
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)

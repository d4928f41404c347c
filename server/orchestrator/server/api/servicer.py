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
from orchestrator.server.schedule_control import ScheduleControl
from orchestrator.server.webhooks import WebhookControl
from orchestrator.v1 import orchestrator_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class OrchestratorServicer:
    """The orchestrator.v1.OrchestratorService RPCs."""

    def __init__(
        self, control: ControlPlane, schedules: ScheduleControl, webhooks: WebhookControl
    ) -> None:
        self._control = control
        self._schedules = schedules
        self._webhooks = webhooks

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

    async def SignalExecution(
        self, request: pb.SignalExecutionRequest, context: Context
    ) -> pb.SignalExecutionResponse:
        """Deliver a signal to a run."""
        structlog.contextvars.bind_contextvars(run_id=request.run_id)
        return await self._control.signal(call_tenant(), request)

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        """Subscribe a URL to the tenant's run events."""
        return pb.CreateWebhookResponse(webhook=await self._webhooks.create(call_tenant(), request))

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        """The tenant's subscriptions."""
        return pb.ListWebhooksResponse(webhooks=await self._webhooks.list_webhooks(call_tenant()))

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        """End a subscription."""
        await self._webhooks.delete(call_tenant(), request.webhook_id)
        return pb.DeleteWebhookResponse()

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        """A subscription's recent deliveries."""
        deliveries = await self._webhooks.deliveries(call_tenant(), request)
        return pb.ListWebhookDeliveriesResponse(deliveries=deliveries)

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

    # ---------------------------------------------------------------- plans and schedules

    async def GetPlan(self, request: pb.GetPlanRequest, context: Context) -> pb.GetPlanResponse:
        """One stored plan."""
        return pb.GetPlanResponse(
            plan=await self._schedules.get_plan(call_tenant(), request.plan_hash)
        )

    async def ListPlans(
        self, request: pb.ListPlansRequest, context: Context
    ) -> pb.ListPlansResponse:
        """A page of the tenant's stored plans."""
        return await self._schedules.list_plans(call_tenant(), request)

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Context
    ) -> pb.CreateScheduleResponse:
        """Store a new schedule."""
        return pb.CreateScheduleResponse(
            schedule=await self._schedules.create(call_tenant(), request.schedule)
        )

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Context
    ) -> pb.GetScheduleResponse:
        """One schedule."""
        return pb.GetScheduleResponse(
            schedule=await self._schedules.get(call_tenant(), request.schedule_id)
        )

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        """A page of the tenant's schedules."""
        return await self._schedules.list_schedules(call_tenant(), request)

    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Context
    ) -> pb.UpdateScheduleResponse:
        """Replace a schedule's definition."""
        return pb.UpdateScheduleResponse(
            schedule=await self._schedules.update(call_tenant(), request.schedule)
        )

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> pb.DeleteScheduleResponse:
        """Remove a schedule."""
        await self._schedules.delete(call_tenant(), request.schedule_id)
        return pb.DeleteScheduleResponse()

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Context
    ) -> pb.PauseScheduleResponse:
        """Stop a schedule from firing."""
        return pb.PauseScheduleResponse(
            schedule=await self._schedules.pause(call_tenant(), request.schedule_id, True)
        )

    async def UnpauseSchedule(
        self, request: pb.UnpauseScheduleRequest, context: Context
    ) -> pb.UnpauseScheduleResponse:
        """Let a paused schedule fire again."""
        return pb.UnpauseScheduleResponse(
            schedule=await self._schedules.pause(call_tenant(), request.schedule_id, False)
        )

    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest, context: Context
    ) -> pb.TriggerScheduleResponse:
        """Start one run of a schedule now."""
        execution = await self._schedules.trigger(call_tenant(), request.schedule_id)
        structlog.contextvars.bind_contextvars(run_id=execution.run_id)
        return pb.TriggerScheduleResponse(execution=execution)


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

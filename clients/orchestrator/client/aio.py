"""`OrchestratorClient`: the asynchronous (grpc.aio) client."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from orchestrator.client.connection import Connection
from orchestrator.client.errors import Unavailable, from_aio_error
from orchestrator.client.messages import (
    DurationLike,
    PlanSource,
    StatusLike,
    StructLike,
    execute_request,
    execution_filter,
    to_value,
)
from orchestrator.client.streams import (
    EXECUTE_ATTEMPTS,
    RECONNECT_TIMEOUT,
    Backoff,
    WatchCursor,
    WatchRetry,
)
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from orchestrator.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ItemT = TypeVar("ItemT")

_UNSET: Any = object()


class OrchestratorClient:
    """Asynchronous client of one tenant on one server.

    Use it as `async with OrchestratorClient("host:port", tenant) as client:`. Every failed
    call raises an `OrchestratorError` subclass carrying the server's reason and details.
    """

    def __init__(
        self,
        address: str,
        tenant: str,
        *,
        correlation_id: str | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        options: Sequence[tuple[str, Any]] = (),
        rpc_timeout: float | None = 30.0,
    ) -> None:
        self.connection = Connection(
            address=address,
            tenant=tenant,
            correlation_id=correlation_id,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            options=tuple(options),
        )
        #: Deadline of each unary call in seconds (None: none). Execute(wait=True) has none.
        self.rpc_timeout = rpc_timeout
        self._metadata = self.connection.metadata()
        if self.connection.secure:
            self._channel = grpc.aio.secure_channel(
                address, self.connection.credentials(), self.connection.channel_options()
            )
        else:
            self._channel = grpc.aio.insecure_channel(address, self.connection.channel_options())
        self._stub: OrchestratorServiceAsyncStub = pb_grpc.OrchestratorServiceStub(self._channel)

    async def __aenter__(self) -> OrchestratorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _call(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        deadline: float | None = _UNSET,
    ) -> ResponseT:
        try:
            return await rpc(
                request,
                metadata=self._metadata,
                timeout=self.rpc_timeout if deadline is _UNSET else deadline,
            )
        except grpc.aio.AioRpcError as err:
            raise from_aio_error(err) from err

    async def _pages(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: Callable[[int, str], RequestT],
        page: Callable[[ResponseT], tuple[Sequence[ItemT], str]],
        page_size: int,
        limit: int | None,
    ) -> AsyncIterator[ItemT]:
        """Every item of a paged List call, fetched a page at a time; at most `limit`."""
        token, seen = "", 0
        while limit is None or seen < limit:
            size = page_size if limit is None else min(page_size, limit - seen)
            items, token = page(await self._call(rpc, request(size, token)))
            for item in items:
                yield item
                seen += 1
            if not token:
                return

    async def execute(
        self,
        plan: PlanSource | None,
        *,
        parameters: StructLike | None = None,
        variables: StructLike | None = None,
        dry_run: bool = False,
        idempotency_key: str = "",
        wait: bool = False,
        timeout: DurationLike | None = None,  # noqa: ASYNC109 (the run's timeout, not the call's)
        triggered_by: str = "",
        validate_capabilities: bool | None = None,
        labels: Mapping[str, str] | None = None,
        concurrency_key: str = "",
        max_concurrent: int = 0,
        priority: int = 0,
        plan_hash: str = "",
    ) -> pb.ExecuteResponse:
        """Submit `plan` (a message, a proto3 JSON dict or a JSON file's path) as a new run;
        with `plan=None` and a `plan_hash`, the tenant's stored plan of that hash.

        `wait=True` returns once the run is terminal (`async_execution=false`); `timeout` is
        the run's timeout. With an `idempotency_key` the call is retried when the server is
        unavailable: the key makes the server return the first run rather than a second.
        """
        request = execute_request(
            plan,
            parameters=parameters,
            variables=variables,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            wait=wait,
            timeout=timeout,
            triggered_by=triggered_by,
            validate_capabilities=validate_capabilities,
            labels=labels,
            concurrency_key=concurrency_key,
            max_concurrent=max_concurrent,
            priority=priority,
            plan_hash=plan_hash,
        )
        backoff = Backoff(initial=0.2, maximum=2.0)
        attempt = 1
        while True:
            try:
                return await self._call(
                    self._stub.Execute, request, None if wait else self.rpc_timeout
                )
            except Unavailable:
                if not idempotency_key or attempt >= EXECUTE_ATTEMPTS:
                    raise
            attempt += 1
            await asyncio.sleep(backoff.delay())

    async def get(self, run_id: str) -> pb.Execution:
        """The current state of one run."""
        response = await self._call(self._stub.GetExecution, pb.GetExecutionRequest(run_id=run_id))
        return response.execution

    async def list(
        self,
        *,
        statuses: Iterable[StatusLike] = (),
        plan_hash: str = "",
        triggered_by: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        plan_id: str = "",
        full: bool = False,
        page_size: int = 100,
        limit: int | None = None,
    ) -> AsyncIterator[pb.Execution]:
        """The tenant's runs, newest first, fetched a page at a time; at most `limit`. Each
        comes without step outputs and results (the BASIC view) unless `full`."""
        flt = execution_filter(
            statuses, plan_hash, triggered_by, created_after, created_before, labels, plan_id
        )
        view = pb.EXECUTION_VIEW_FULL if full else pb.EXECUTION_VIEW_BASIC
        async for execution in self._pages(
            self._stub.ListExecutions,
            lambda size, token: pb.ListExecutionsRequest(
                filter=flt, page_size=size, page_token=token, view=view
            ),
            lambda page: (page.executions, page.next_page_token),
            page_size,
            limit,
        ):
            yield execution

    async def pause(self, run_id: str, reason: str = "") -> pb.PauseResponse:
        """Stop new steps from starting (PENDING or RUNNING runs)."""
        return await self._call(self._stub.Pause, pb.PauseRequest(run_id=run_id, reason=reason))

    async def resume(self, run_id: str, reason: str = "") -> pb.ResumeResponse:
        """Continue a PAUSED run."""
        return await self._call(self._stub.Resume, pb.ResumeRequest(run_id=run_id, reason=reason))

    async def cancel(self, run_id: str, reason: str = "") -> pb.CancelResponse:
        """Cancel a PENDING, RUNNING or PAUSED run."""
        return await self._call(self._stub.Cancel, pb.CancelRequest(run_id=run_id, reason=reason))

    async def retry(
        self, run_id: str, restart_step_ids: Sequence[str] = (), reason: str = ""
    ) -> pb.Execution:
        """Send a FAILED or CANCELLED run (or, from the named steps, a COMPLETED one) back to
        RUNNING; completed steps are kept, the rest run again. Returns the run after it."""
        response = await self._call(
            self._stub.RetryExecution,
            pb.RetryExecutionRequest(
                run_id=run_id, restart_step_ids=list(restart_step_ids), reason=reason
            ),
        )
        return response.execution

    async def respond(
        self, run_id: str, clarification_id: str, value: Any, responded_by: str = ""
    ) -> pb.Execution:
        """Answer a pending clarification with any JSON value; returns the run after it."""
        response = await self._call(
            self._stub.RespondToClarification,
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=clarification_id,
                response=to_value(value),
                responded_by=responded_by,
            ),
        )
        return response.execution

    # ---------------------------------------------------------------- plans and schedules

    async def get_plan(self, plan_hash: str) -> pb.StoredPlan:
        """One of the tenant's stored plans, with its body."""
        response = await self._call(self._stub.GetPlan, pb.GetPlanRequest(plan_hash=plan_hash))
        return response.plan

    async def list_plans(
        self, *, page_size: int = 100, limit: int | None = None
    ) -> AsyncIterator[pb.StoredPlan]:
        """The tenant's stored plans (without bodies), most recently stored first."""
        async for plan in self._pages(
            self._stub.ListPlans,
            lambda size, token: pb.ListPlansRequest(page_size=size, page_token=token),
            lambda page: (page.plans, page.next_page_token),
            page_size,
            limit,
        ):
            yield plan

    async def create_schedule(self, schedule: pb.Schedule) -> pb.Schedule:
        """Store a new schedule (see `schedule_message`); returns it as stored."""
        request = pb.CreateScheduleRequest(schedule=schedule)
        return (await self._call(self._stub.CreateSchedule, request)).schedule

    async def get_schedule(self, schedule_id: str) -> pb.Schedule:
        """One schedule with its recent actions and next fire times."""
        request = pb.GetScheduleRequest(schedule_id=schedule_id)
        return (await self._call(self._stub.GetSchedule, request)).schedule

    async def list_schedules(
        self, *, page_size: int = 100, limit: int | None = None
    ) -> AsyncIterator[pb.Schedule]:
        """The tenant's schedules, by id."""
        async for schedule in self._pages(
            self._stub.ListSchedules,
            lambda size, token: pb.ListSchedulesRequest(page_size=size, page_token=token),
            lambda page: (page.schedules, page.next_page_token),
            page_size,
            limit,
        ):
            yield schedule

    async def update_schedule(self, schedule: pb.Schedule) -> pb.Schedule:
        """Replace a schedule's definition; returns it as stored."""
        request = pb.UpdateScheduleRequest(schedule=schedule)
        return (await self._call(self._stub.UpdateSchedule, request)).schedule

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule (its runs stay)."""
        await self._call(
            self._stub.DeleteSchedule, pb.DeleteScheduleRequest(schedule_id=schedule_id)
        )

    async def pause_schedule(self, schedule_id: str) -> pb.Schedule:
        """Stop a schedule from firing."""
        request = pb.PauseScheduleRequest(schedule_id=schedule_id)
        return (await self._call(self._stub.PauseSchedule, request)).schedule

    async def unpause_schedule(self, schedule_id: str) -> pb.Schedule:
        """Let a paused schedule fire again, from its next fire time."""
        request = pb.UnpauseScheduleRequest(schedule_id=schedule_id)
        return (await self._call(self._stub.UnpauseSchedule, request)).schedule

    async def trigger_schedule(self, schedule_id: str) -> pb.Execution:
        """Start one run of the schedule now; returns the run."""
        request = pb.TriggerScheduleRequest(schedule_id=schedule_id)
        return (await self._call(self._stub.TriggerSchedule, request)).execution

    async def signal(
        self, run_id: str, signal_name: str, payload: Any = None, request_id: str = ""
    ) -> pb.SignalExecutionResponse:
        """Send a signal (any JSON payload) to a run; a `request_id` sent again delivers
        nothing new (the response says `duplicate`)."""
        response: pb.SignalExecutionResponse = await self._call(
            self._stub.SignalExecution,
            pb.SignalExecutionRequest(
                run_id=run_id,
                signal_name=signal_name,
                payload=to_value(payload),
                request_id=request_id,
            ),
        )
        return response

    async def create_webhook(
        self,
        url: str,
        event_types: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> pb.Webhook:
        """Subscribe `url` to the tenant's run events; the answer holds the signing secret."""
        response: pb.CreateWebhookResponse = await self._call(
            self._stub.CreateWebhook,
            pb.CreateWebhookRequest(
                webhook=pb.Webhook(url=url, event_types=list(event_types), labels=labels or {})
            ),
        )
        return response.webhook

    async def list_webhooks(self) -> builtins.list[pb.Webhook]:
        """The tenant's subscriptions (without secrets)."""
        response: pb.ListWebhooksResponse = await self._call(
            self._stub.ListWebhooks, pb.ListWebhooksRequest()
        )
        return list(response.webhooks)

    async def delete_webhook(self, webhook_id: str) -> None:
        """End a subscription."""
        await self._call(self._stub.DeleteWebhook, pb.DeleteWebhookRequest(webhook_id=webhook_id))

    async def webhook_deliveries(
        self, webhook_id: str, limit: int = 50
    ) -> builtins.list[pb.WebhookDelivery]:
        """A subscription's recent deliveries, newest first."""
        response: pb.ListWebhookDeliveriesResponse = await self._call(
            self._stub.ListWebhookDeliveries,
            pb.ListWebhookDeliveriesRequest(webhook_id=webhook_id, page_size=limit),
        )
        return list(response.deliveries)

    async def watch(
        self,
        run_id: str,
        after_sequence: int = 0,
        *,
        heartbeats: bool = False,
        from_start: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (spans reconnects: asyncio.timeout cannot)
        reconnect_timeout: float | None = RECONNECT_TIMEOUT,
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """Every event of a run, each once and in order, until its terminal event.

        From `after_sequence=0`: a SNAPSHOT first (with `from_start`, every event from the
        first instead), then each later event. A dropped stream
        (server restarting, connection reset) is reopened with back-off from the last
        sequence seen. HEARTBEATs are skipped unless `heartbeats`. Raises TimeoutError after
        `timeout` seconds in all, and the last error once reconnecting failed for
        `reconnect_timeout` seconds.
        """
        cursor = WatchCursor(position=after_sequence, heartbeats=heartbeats, from_start=from_start)
        retry = WatchRetry(run_id, timeout, reconnect_timeout)
        while True:
            call = self._stub.WatchExecution(
                cursor.request(run_id),
                metadata=self._metadata,
                timeout=retry.remaining(),
            )
            try:
                async for response in call:
                    retry.received()
                    if cursor.accept(response.event):
                        yield response.event
                    if cursor.done:
                        return
                return  # ended OK: the server has nothing more for this run
            except grpc.aio.AioRpcError as err:
                error = from_aio_error(err)
                error.__cause__ = err
                delay = retry.failed(error)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def wait(
        self,
        run_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (same as the sync client's)
    ) -> pb.Execution:
        """The run once it is terminal (watched, not polled). TimeoutError after `timeout`."""
        last: pb.ExecutionEvent | None = None
        async for event in self.watch(run_id, timeout=timeout):
            last = event
        if last is not None and last.type == pb.EVENT_TYPE_SNAPSHOT:
            return last.execution  # already terminal: the snapshot is the full run
        return await self.get(run_id)

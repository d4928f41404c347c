"""The control plane: what every RPC does, in domain terms (the servicer only translates)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.server.engine import Engine
from orchestrator.server.engine.slots import DEFAULT_PRIORITY
from orchestrator.server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ValidationFailed,
)
from orchestrator.server.labels import label_violations
from orchestrator.server.lifecycle import Action, RunStatus
from orchestrator.server.plan import (
    MAX_REQUEST_STRING,
    Limits,
    ValidatedPlan,
    ValidationCache,
    check_capabilities,
    finite,
    json_depth,
    struct_to_python,
    validate_request,
    value_to_python,
)
from orchestrator.server.security import ExecuteRateLimiter, TenantPolicy
from orchestrator.server.settings import Settings
from orchestrator.server.store.journal import Journal
from orchestrator.server.store.plans import PlanStore
from orchestrator.server.store.records import NewRun, NewStep, RetryRun, RunFilter, Transitioned
from orchestrator.server.store.runs import RunStore, not_found
from orchestrator.server.store.snapshots import RUN_STATUS_PB, timestamp
from orchestrator.server.tokens import TokenCodec
from orchestrator.server.tools import ToolRegistry
from orchestrator.server.tools.builtin import MAX_SIGNAL_NAME
from orchestrator.server.tracing import current_traceparent
from orchestrator.server.watch import TERMINAL_PB, Hub, Watcher
from orchestrator.server.wire import request_size
from orchestrator.v1 import orchestrator_pb2 as pb

PB_RUN_STATUS = {v: k for k, v in RUN_STATUS_PB.items()}

# Without history for a plan, a run is estimated at this many seconds per step.
FALLBACK_SECONDS_PER_STEP = 1.0
ESTIMATE_TTL = 10.0
ESTIMATE_CACHE_SIZE = 10_000


@dataclass
class ControlPlane:
    """Accepts, reads, lists, controls and streams runs."""

    settings: Settings
    store: RunStore
    hub: Hub
    tokens: TokenCodec
    registry: ToolRegistry
    engine: Engine
    journal: Journal
    policy: TenantPolicy | None = None
    plans: PlanStore = field(init=False)

    def __post_init__(self) -> None:
        self.plans = PlanStore(self.store.db)
        self.watcher = Watcher(self.store, self.hub, self.tokens, self.settings.heartbeat_seconds)
        self.limits = Limits(
            max_steps=self.settings.max_steps_per_plan,
            max_struct_depth=self.settings.max_struct_depth,
        )
        self.rate = ExecuteRateLimiter(self.settings.execute_rate, self.settings.execute_burst)
        self._estimates: dict[tuple[str, str], tuple[float, float]] = {}
        self.validations = ValidationCache()

    async def execute(
        self,
        tenant_id: str,
        correlation_id: str,
        request: pb.ExecuteRequest,
        call_deadline: float | None = None,
    ) -> pb.ExecuteResponse:
        """Validate, then store a run (or find the one its idempotency key names)."""
        wait = self.rate.take(tenant_id, time.monotonic())
        if wait:
            limited = ResourceExhausted(
                "too many Execute calls for this tenant; retry later",
                reason="RATE_LIMITED",
                metadata={"retry_after_seconds": f"{wait:.3f}"},
            )
            limited.retry_delay = wait
            raise limited
        if request.plan_hash and not request.HasField("executable_plan"):
            # Run the tenant's stored plan of that hash (PLAN_NOT_FOUND if it has none).
            stored = await self.plans.plan(tenant_id, request.plan_hash)
            request = _with_plan(request, stored)
        # A large request's checks and conversions are long Python work: off the event loop
        # (the loop gets the interpreter back every switch interval, a few ms).
        if request_size(request) > OFF_LOOP_REQUEST_BYTES:
            checked = await asyncio.to_thread(self.check_request, tenant_id, request)
        else:
            checked = self.check_request(tenant_id, request)
        validated = checked.validated
        estimate = await self._estimate(tenant_id, validated.plan_hash, len(validated.steps))
        new = self.new_run(tenant_id, correlation_id, request, checked, estimate)
        try:
            created = await self.store.create_run(new)
        except BaseException:
            self.engine.settle(new.run_id)  # adopted (see new_run), never created
            raise
        if not created.created:
            self.engine.settle(new.run_id)
        execution = created.execution
        run_id = execution.run_id
        if created.created and not request.dry_run:
            if new.owner:
                self.engine.submit(run_id, created.inserted)
            else:
                self.engine.wake_claimer()
        if (
            request.HasField("async_execution")
            and not request.async_execution
            and execution.status not in TERMINAL_PB
        ):
            # Bounded by the run's timeout and by the caller's own deadline.
            limit = validated.timeout_seconds + 5
            if call_deadline is not None:
                limit = min(limit, max(call_deadline - time.monotonic() - 0.2, 0.0))
            execution = await self.wait_terminal(tenant_id, run_id, limit)
        response = pb.ExecuteResponse(
            success=True,
            run_id=run_id,
            status=execution.status,
            created_at=execution.created_at,
            correlation_id=execution.correlation_id,
            execution=execution,
        )
        response.estimated_duration.FromNanoseconds(int(estimate * 1e9))
        return response

    def new_run(
        self,
        tenant_id: str,
        correlation_id: str,
        request: pb.ExecuteRequest,
        checked: CheckedRequest,
        estimate: float,
    ) -> NewRun:
        """The run a checked request creates (owned here when this replica is alone)."""
        validated = checked.validated
        new = NewRun(
            run_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            plan=request.executable_plan,
            plan_hash=validated.plan_hash,
            parameters=checked.parameters,
            variables=checked.variables,
            dry_run=request.dry_run,
            triggered_by=request.triggered_by,
            correlation_id=request.correlation_id or correlation_id,
            timeout_seconds=validated.timeout_seconds,
            estimated_seconds=estimate,
            steps=[
                NewStep(
                    step_id=sid, flow_id=info.flow_id, position=info.position, tool=info.step.tool
                )
                for sid, info in validated.steps.items()
            ],
            idempotency_key=request.idempotency_key,
            request_digest=checked.digest,
            dry_run_order=validated.order if request.dry_run else None,
            trace_parent=current_traceparent(),
            max_unfinished=self.settings.max_runs_per_tenant,
            labels=dict(request.labels),
            concurrency_key=request.concurrency_key,
            max_concurrent=(request.max_concurrent or 1) if request.concurrency_key else 0,
            priority=request.priority or DEFAULT_PRIORITY,
        )
        if (
            self.engine.enabled
            and not request.dry_run
            and (self.engine.single_replica or self.engine.adopt(tenant_id, new.run_id))
        ):
            # One replica on its own store runs what it accepts, without a claim round trip;
            # among several, so does a replica with a step slot free to the tenant now.
            new.owner = self.engine.owner
            new.lease_expires_at = time.time() + self.engine.lease_seconds
        return new

    def cached_estimate(self, tenant_id: str, plan_hash: str, steps: int) -> float:
        """The estimate without a store read: the cached one, else the per-step fallback."""
        cached = self._estimates.get((tenant_id, plan_hash))
        return cached[0] if cached is not None else FALLBACK_SECONDS_PER_STEP * steps

    def check_request(self, tenant_id: str, request: pb.ExecuteRequest) -> CheckedRequest:
        """Everything Execute works out from the request alone (no store, no loop)."""
        bad_labels = label_violations(request.labels, "labels")
        if bad_labels:
            raise ValidationFailed("invalid labels", violations=bad_labels)
        validated = validate_request(request, self.registry, self.limits, self.validations)
        if not request.HasField("validate_capabilities") or request.validate_capabilities:
            granted = self.policy.granted(tenant_id) if self.policy is not None else None
            check_capabilities(request.executable_plan, self.registry, granted)
        elif self.policy is not None:
            self._check_grants(tenant_id, validated)
        # The request's values as validation converted them (in the walk that bounds them).
        parameters = validated.parameters
        missing = validated.missing_parameters(parameters)
        if missing:
            raise ValidationFailed("the plan reads parameters it is not given", violations=missing)
        variables = struct_to_python(request.executable_plan.variables)
        variables.update(validated.variables)
        return CheckedRequest(
            validated=validated,
            parameters=parameters,
            variables=variables,
            digest=request_digest(request) if request.idempotency_key else "",
        )

    def _check_answer(self, request: pb.RespondToClarificationRequest) -> tuple[Any, bool]:
        """The answer as JSON, and whether it can be stored (finite, not too deep)."""
        response = value_to_python(request.response) if request.HasField("response") else None
        depth = self.settings.max_struct_depth
        return response, finite(response) and json_depth(response, depth) <= depth

    async def _estimate(self, tenant_id: str, plan_hash: str, steps: int) -> float:
        """Expected duration: the median of recent completed runs of the plan (cached for a
        few seconds: an estimate needs no fresher data, and Execute should not pay a read)."""
        key = (tenant_id, plan_hash)
        now = time.monotonic()
        cached = self._estimates.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        measured = await self.store.estimate_seconds(tenant_id, plan_hash)
        estimate = measured if measured is not None else FALLBACK_SECONDS_PER_STEP * steps
        if len(self._estimates) > ESTIMATE_CACHE_SIZE:
            self._estimates.clear()
        self._estimates[key] = (estimate, now + ESTIMATE_TTL)
        return estimate

    def _check_grants(self, tenant_id: str, validated: ValidatedPlan) -> None:
        """The tenant policy holds even when the caller turns capability validation off."""
        assert self.policy is not None
        granted = self.policy.granted(tenant_id)
        flow_index = {flow.flow_id: i for i, flow in enumerate(validated.plan.flows)}
        violations = []
        for info in validated.steps.values():
            tool = self.registry.get(info.step.tool)
            for capability in sorted((tool.capabilities if tool else frozenset()) - granted):
                violations.append(
                    FieldViolation(
                        f"executable_plan.flows[{flow_index[info.flow_id]}].steps[{info.index}].tool",
                        f"{info.step.tool} needs {capability}, not granted to the tenant",
                    )
                )
        if violations:
            raise PermissionDenied(
                "capabilities not granted to the tenant",
                reason="CAPABILITY_DENIED",
                violations=violations,
            )

    async def wait_terminal(self, tenant_id: str, run_id: str, limit: float) -> pb.Execution:
        """The run's snapshot once it is terminal, or as it is after `limit` seconds."""
        with self.hub.run(run_id) as (wake, _channel):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limit
            while True:
                wake.clear()
                execution = await self.store.get_execution(tenant_id, run_id)
                remaining = deadline - loop.time()
                if execution.status in TERMINAL_PB or remaining <= 0:
                    return execution
                try:
                    async with asyncio.timeout(remaining):
                        await wake.wait()
                except TimeoutError:
                    pass

    async def get(self, tenant_id: str, run_id: str) -> pb.Execution:
        """One run's snapshot."""
        _require_run_id(run_id)
        return await self.store.get_execution(tenant_id, run_id)

    async def list(
        self, tenant_id: str, request: pb.ListExecutionsRequest
    ) -> pb.ListExecutionsResponse:
        """A page of the tenant's runs, newest first; keyset paging so inserts never shift it."""
        if request.page_size < 0:
            raise ValidationFailed(
                "page_size must not be negative",
                violations=[FieldViolation("page_size", "must be 0 (default 50) to 500")],
            )
        if request.view not in pb.ExecutionView.values():
            raise ValidationFailed(
                "view is not an ExecutionView",
                violations=[FieldViolation("view", "EXECUTION_VIEW_BASIC or EXECUTION_VIEW_FULL")],
            )
        size = min(
            request.page_size or self.settings.default_page_size, self.settings.max_page_size
        )
        flt = run_filter(request.filter, "filter")
        digest = hashlib.sha256(request.filter.SerializeToString(deterministic=True)).hexdigest()
        before_pk = None
        watch_cursor = ""
        if request.page_token:
            token = self.tokens.decode("page", request.page_token, field="page_token")
            if (
                token.get("f") != digest[:16]
                or token.get("t") != tenant_id
                or not isinstance(token.get("pk"), int)
            ):
                raise InvalidArgument(
                    "page_token belongs to a different query", reason="INVALID_PAGE_TOKEN"
                )
            before_pk = token["pk"]
            # Every page of a listing gives its first page's cursor (a token from before it
            # was kept had none: then this page's own).
            kept = token.get("w")
            watch_cursor = kept if isinstance(kept, str) else ""
        if not watch_cursor:
            # Before the page: a change committed while it is read is then in the watch too.
            watch_cursor = await self.watcher.start_cursor(tenant_id)
        page = await self.store.list_executions(
            tenant_id,
            flt,
            limit=size,
            before_pk=before_pk,
            full=request.view == pb.EXECUTION_VIEW_FULL,
        )
        response = pb.ListExecutionsResponse(executions=page.executions, watch_cursor=watch_cursor)
        if page.last_pk is not None:
            response.next_page_token = self.tokens.encode(
                "page", {"pk": page.last_pk, "f": digest[:16], "t": tenant_id, "w": watch_cursor}
            )
        return response

    async def control(
        self, tenant_id: str, run_id: str, action: Action, reason: str
    ) -> Transitioned:
        """Pause, Resume or Cancel."""
        _require_run_id(run_id)
        result = await self.journal.control(tenant_id, run_id, action, reason)
        self.engine.control(run_id, result.status)
        return result

    async def retry(self, tenant_id: str, request: pb.RetryExecutionRequest) -> pb.Execution:
        """Send a finished run back to RUNNING: what did not complete runs again, and so do
        the named restart steps with everything downstream of them."""
        _require_run_id(request.run_id)
        _check_reason(request.reason)
        plan = validate_request(
            pb.ExecuteRequest(executable_plan=await self.store.run_plan(tenant_id, request.run_id)),
            self.registry,
            cache=self.validations,
        )
        violations = [
            FieldViolation(f"restart_step_ids[{i}]", f"{sid!r} is not a step of the run's plan")
            for i, sid in enumerate(request.restart_step_ids)
            if sid not in plan.steps
        ]
        if violations:
            raise ValidationFailed("unknown restart steps", violations=violations)
        owner, lease = "", None
        if self.engine.enabled and self.engine.single_replica:
            owner, lease = self.engine.owner, time.time() + self.engine.lease_seconds
        execution = await self.store.retry(
            RetryRun(
                tenant_id=tenant_id,
                run_id=request.run_id,
                restart_step_ids=tuple(request.restart_step_ids),
                # Compensation is reset too: it runs again only if the flow fails again.
                rerun_step_ids=frozenset(
                    downstream(plan, request.restart_step_ids) | plan.rollback
                ),
                reason=request.reason,
                owner=owner,
                lease_expires_at=lease,
            )
        )
        if owner:
            self.engine.retried(request.run_id)
        else:
            self.engine.wake_claimer()
        return execution

    async def respond(
        self, tenant_id: str, request: pb.RespondToClarificationRequest
    ) -> pb.Execution:
        """Answer a pending clarification."""
        _require_run_id(request.run_id)
        if len(request.responded_by) > MAX_REQUEST_STRING:
            raise ValidationFailed(
                "responded_by is too long",
                violations=[FieldViolation("responded_by", "must be at most 256 characters")],
            )
        if not request.clarification_id:
            raise ValidationFailed(
                "clarification_id is required",
                violations=[FieldViolation("clarification_id", "required")],
            )
        if not _is_uuid(request.clarification_id):
            await self.store.run_status(tenant_id, request.run_id)  # NotFound for the run first
            raise NotFound(
                f"clarification {request.clarification_id!r} not found",
                reason="CLARIFICATION_NOT_FOUND",
                metadata={"run_id": request.run_id},
            )
        if "\x00" in request.responded_by:
            raise ValidationFailed(
                "responded_by has a NUL character",
                violations=[FieldViolation("responded_by", "must not contain NUL characters")],
            )
        found = await self.store.clarification(tenant_id, request.run_id, request.clarification_id)
        if found.status != "PENDING":
            raise FailedPrecondition(
                f"clarification {request.clarification_id!r} is {found.status.lower()}",
                reason="CLARIFICATION_NOT_PENDING",
                metadata={
                    "run_id": request.run_id,
                    "clarification_id": request.clarification_id,
                    "current_status": found.status,
                },
            )
        # A large answer's conversion and checks are long Python work: off the event loop.
        if request_size(request) > OFF_LOOP_REQUEST_BYTES:
            response, fits = await asyncio.to_thread(self._check_answer, request)
        else:
            response, fits = self._check_answer(request)
        depth = self.settings.max_struct_depth
        if not fits:
            raise ValidationFailed(
                "the response cannot be stored",
                violations=[
                    FieldViolation(
                        "response",
                        f"must be JSON nested at most {depth} deep, without NaN or infinity",
                    )
                ],
            )
        check_answer(found.category, list(found.options), response)
        answer = await self.journal.answer(
            tenant_id, request.run_id, request.clarification_id, response, request.responded_by
        )
        self.engine.answered(request.run_id, request.clarification_id, answer)
        return await self.store.get_execution(tenant_id, request.run_id)

    async def signal(
        self, tenant_id: str, request: pb.SignalExecutionRequest
    ) -> pb.SignalExecutionResponse:
        """Deliver a signal to a run, once per request id."""
        _require_run_id(request.run_id)
        violations = []
        name = request.signal_name
        if not name or len(name) > MAX_SIGNAL_NAME or "\x00" in name:
            violations.append(
                FieldViolation(
                    "signal_name",
                    f"required, at most {MAX_SIGNAL_NAME} characters, without NUL characters",
                )
            )
        if len(request.request_id) > MAX_REQUEST_STRING or "\x00" in request.request_id:
            violations.append(
                FieldViolation(
                    "request_id", "must be at most 256 characters, without NUL characters"
                )
            )
        payload = value_to_python(request.payload) if request.HasField("payload") else None
        depth = self.settings.max_struct_depth
        if not finite(payload) or json_depth(payload, depth) > depth:
            violations.append(
                FieldViolation(
                    "payload", f"must be JSON nested at most {depth} deep, without NaN or infinity"
                )
            )
        if violations:
            raise ValidationFailed("invalid signal", violations=violations)
        # Without a key of the caller's, each call is a signal of its own.
        request_id = request.request_id or f"auto:{uuid.uuid4()}"
        duplicate = await self.journal.signal(tenant_id, request.run_id, name, payload, request_id)
        if not duplicate:
            self.engine.signalled(request.run_id, name)
        return pb.SignalExecutionResponse(
            execution=await self.store.get_execution(tenant_id, request.run_id),
            duplicate=duplicate,
        )

    def watch(self, tenant_id: str, request: pb.WatchExecutionRequest) -> AsyncIterator[bytes]:
        _require_run_id(request.run_id)
        return self.watcher.run_events(
            tenant_id, request.run_id, request.after_sequence, from_start=request.from_start
        )

    def watch_all(self, tenant_id: str, request: pb.WatchExecutionsRequest) -> AsyncIterator[bytes]:
        return self.watcher.tenant_changes(
            tenant_id, run_filter(request.filter, "filter"), request.after_cursor
        )


def check_answer(category: str, options: list[str], response: Any) -> None:
    """A multiple-choice answer is one of the options; a verification is true or false."""
    if category == "MULTIPLE_CHOICE" and options and response not in options:
        raise ValidationFailed(
            "the response is not one of the options",
            violations=[FieldViolation("response", "must be one of: " + ", ".join(options))],
        )
    if category == "USER_VERIFICATION" and not isinstance(response, bool):
        raise ValidationFailed(
            "a user verification is answered true or false",
            violations=[FieldViolation("response", "must be a bool")],
        )
    if response is None:
        raise ValidationFailed(
            "response is required", violations=[FieldViolation("response", "required")]
        )


# Execute checks requests larger than this in a thread (see ControlPlane.execute).
OFF_LOOP_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class CheckedRequest:
    """An Execute request's validated plan and converted inputs."""

    validated: ValidatedPlan
    parameters: dict[str, Any]
    variables: dict[str, Any]
    digest: str


def _with_plan(request: pb.ExecuteRequest, plan: pb.ExecutablePlan) -> pb.ExecuteRequest:
    filled = pb.ExecuteRequest()
    filled.CopyFrom(request)
    filled.executable_plan.CopyFrom(plan)
    return filled


def request_digest(request: pb.ExecuteRequest) -> str:
    """What makes two Execute requests "the same" for an idempotency key: everything that
    changes what runs. The correlation id and async flag only change how the call is made."""
    copy = pb.ExecuteRequest()
    copy.CopyFrom(request)
    copy.ClearField("correlation_id")
    copy.ClearField("async_execution")
    return "sha256:" + hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def run_filter(flt: pb.ExecutionFilter, path: str) -> RunFilter:
    """The store filter for a request filter; INVALID_ARGUMENT for statuses that do not exist."""
    violations = []
    statuses: list[RunStatus] = []
    for i, status in enumerate(flt.statuses):
        if status not in PB_RUN_STATUS:
            violations.append(FieldViolation(f"{path}.statuses[{i}]", "not a run status"))
        else:
            statuses.append(PB_RUN_STATUS[status])
    after = _filter_time(flt, "created_after", path, violations)
    before = _filter_time(flt, "created_before", path, violations)
    for name in ("plan_hash", "triggered_by", "plan_id"):
        if "\x00" in getattr(flt, name):
            violations.append(FieldViolation(f"{path}.{name}", "must not contain NUL characters"))
    violations += label_violations(flt.labels, f"{path}.labels")
    if after is not None and before is not None and after > before:
        violations.append(FieldViolation(f"{path}.created_before", "is before created_after"))
    if violations:
        raise ValidationFailed("invalid filter", violations=violations)
    return RunFilter(
        statuses=statuses,
        plan_hash=flt.plan_hash,
        triggered_by=flt.triggered_by,
        created_after=after,
        created_before=before,
        labels=dict(flt.labels),
        plan_id=flt.plan_id,
    )


def _filter_time(
    flt: pb.ExecutionFilter,
    name: Literal["created_after", "created_before"],
    path: str,
    violations: list[FieldViolation],
) -> float | None:
    """A filter timestamp in epoch seconds; a violation when it is not a valid Timestamp."""
    if not flt.HasField(name):
        return None
    stamp = getattr(flt, name)
    # google.protobuf.Timestamp: 0001-01-01 to 9999-12-31, nanos in [0, 1e9).
    if not (-62135596800 <= stamp.seconds <= 253402300799 and 0 <= stamp.nanos < 10**9):
        violations.append(FieldViolation(f"{path}.{name}", "not a valid Timestamp"))
        return None
    return float(stamp.ToNanoseconds()) / 1e9


def downstream(plan: ValidatedPlan, step_ids: Iterable[str]) -> set[str]:
    """`step_ids` and every step that depends on them, directly or not (`depends_on`, and in a
    sequential flow the steps listed after)."""
    after: dict[str, list[str]] = {}
    for sid, info in plan.steps.items():
        for needed in (*info.depends_on, *((info.runs_after,) if info.runs_after else ())):
            after.setdefault(needed, []).append(sid)
    found: set[str] = set()
    todo = list(step_ids)
    while todo:
        sid = todo.pop()
        if sid not in found:
            found.add(sid)
            todo.extend(after.get(sid, ()))
    return found


def _check_reason(reason: str) -> None:
    if len(reason) > MAX_REQUEST_STRING or "\x00" in reason:
        raise ValidationFailed(
            "reason is too long or has a NUL character",
            violations=[
                FieldViolation("reason", "must be at most 256 characters, without NUL characters")
            ],
        )


def _require_run_id(run_id: str) -> None:
    if not run_id:
        raise ValidationFailed(
            "run_id is required", violations=[FieldViolation("run_id", "required")]
        )
    if not _is_uuid(run_id):
        raise not_found(run_id)  # run ids are UUIDs: anything else names no run


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def transition_response(result: Transitioned, verb: str) -> dict[str, Any]:
    """The fields shared by PauseResponse, ResumeResponse and CancelResponse."""
    return {
        "success": True,
        "run_id": result.run_id,
        "status": RUN_STATUS_PB[result.status],
        "message": f"Execution {verb} successfully",
        "timestamp": timestamp(result.at),
    }

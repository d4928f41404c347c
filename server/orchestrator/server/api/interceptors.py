"""The server interceptor: call context (correlation id, access log, metrics), errors (domain
exceptions -> google.rpc.Status) and tenant (x-tenant-id, API keys), in one wrapper per call.

Built on grpc-interceptor's AsyncServerInterceptor. Its `intercept` may hand back a coroutine
or an async generator; `CallInterceptor` uses that to wrap both shapes of call: a unary call
is awaited inside `_unary`, a stream is iterated inside `_stream`, so an error raised
mid-stream is answered like one raised before the first message.
"""

from __future__ import annotations

import contextvars
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_interceptor import AsyncServerInterceptor

from orchestrator.server.errors import (
    DOMAIN,
    FieldViolation,
    InvalidArgument,
    OrchestratorError,
    Unauthenticated,
    ValidationFailed,
)
from orchestrator.server.metrics import Metrics
from orchestrator.server.security import KeyRing
from orchestrator.server.wire import decoded

SERVICE_PREFIX = "/orchestrator.v1.OrchestratorService/"
# Status details travel in trailing metadata, which gRPC caps (8-16 KiB by default): a plan
# with thousands of problems reports the first ones and how many there were.
# Limits are in UTF-8 bytes: grpc-message is percent-encoded (3 characters per non-ASCII
# byte) and the details are base64 (4 per 3), so 1,000 + 6,000 bytes stay under 12 KiB.
MAX_VIOLATIONS = 50
MAX_DESCRIPTION = 200
MAX_MESSAGE = 1000
MAX_DETAILS = 6000


def _clip(text: str, limit: int) -> str:
    """User input quoted in an error, cut to `limit` UTF-8 bytes so the status always fits
    in the trailers."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


log = structlog.get_logger("orchestrator.rpc")


class Undecodable:
    """A request whose bytes did not parse (garbage, or nested past protobuf's limit). The
    deserializer returns this instead of raising, which grpc.aio would answer as UNKNOWN."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def problem(self) -> ValidationFailed:
        return ValidationFailed(
            f"the request is not a valid {self.type_name}",
            violations=[FieldViolation("", f"cannot be decoded: {str(self.error)[:200]}")],
        )


def decoder(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises."""

    def decode(data: bytes) -> Any:
        try:
            message = message_type.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError on deep nesting
            return Undecodable(message_type.DESCRIPTOR.full_name, exc)
        decoded(message, len(data))
        return message

    return decode


@dataclass
class Call:
    """What the interceptors learned about the current call."""

    method: str
    correlation_id: str
    tenant_id: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    metadata: dict[str, str] = field(default_factory=dict)


current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("current_call")


Context = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


_WANTED = frozenset(("x-correlation-id", "x-tenant-id", "authorization"))


def _call_metadata(context: Context) -> dict[str, str]:
    """The metadata the interceptor reads, in one pass (the first value of each key)."""
    found: dict[str, str] = {}
    for k, v in context.invocation_metadata() or ():
        if k in _WANTED and k not in found:
            found[k] = v if isinstance(v, str) else v.decode()
    return found


@functools.cache
def rpc_type(method_name: str) -> str:
    """unary, server_stream, client_stream or bidi_stream, from the method's descriptor."""
    try:
        method = descriptor_pool.Default().FindMethodByName(
            method_name.lstrip("/").replace("/", ".")
        )
    except KeyError:  # reflection v1 is served but not in the pool: it is bidi
        return "bidi_stream"
    streams = (method.client_streaming, method.server_streaming)
    return {
        (False, False): "unary",
        (False, True): "server_stream",
        (True, False): "client_stream",
    }.get(streams, "bidi_stream")


def _rpc_labels(name: str) -> tuple[str, str, str]:
    service, _, method = name.lstrip("/").partition("/")
    return rpc_type(name), service, method


def rich_status(code: grpc.StatusCode, error: OrchestratorError, call: Call | None) -> bytes:
    """A serialized google.rpc.Status with ErrorInfo (and BadRequest for violations)."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)
    if call is not None:
        info.metadata["correlation_id"] = call.correlation_id
    for key, value in error.metadata.items():
        info.metadata[key[:MAX_DESCRIPTION]] = _clip(value, MAX_DESCRIPTION)
    details: list[Message] = [info]
    if error.violations:
        bad = error_details_pb2.BadRequest()
        size = info.ByteSize()
        for v in error.violations[:MAX_VIOLATIONS]:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=_clip(v.field, MAX_DESCRIPTION),
                description=_clip(v.description, MAX_DESCRIPTION),
            )
            size += violation.ByteSize() + 4
            if size > MAX_DETAILS:
                break
            bad.field_violations.append(violation)
        shown = len(bad.field_violations)
        if len(error.violations) > shown:
            info.metadata["violations_total"] = str(len(error.violations))
            bad.field_violations.add(
                field="", description=f"... and {len(error.violations) - shown} more problems"
            )
        details.append(bad)
    if error.retry_delay is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_delay * 1e9))
        details.append(retry)
    status = status_pb2.Status(code=code.value[0], message=_clip(error.message, MAX_MESSAGE))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    serialized: bytes = status.SerializeToString()
    return serialized


def tenant_from(context: Context) -> str:
    """The caller's tenant: x-tenant-id, a UUID, required on every OrchestratorService call."""
    return _tenant(_metadata(context, "x-tenant-id"))


def _tenant(raw: str) -> str:
    raw = raw.strip()
    if not raw:
        raise Unauthenticated("x-tenant-id metadata is required", reason="TENANT_REQUIRED")
    tenant = _canonical_uuid(raw)
    if tenant is None:
        raise InvalidArgument("x-tenant-id must be a UUID", reason="INVALID_TENANT_ID")
    return tenant


@functools.lru_cache(maxsize=4096)
def _canonical_uuid(raw: str) -> str | None:
    """A tenant id in its canonical form (callers send the same few over and over)."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


class _MethodMetrics:
    """One method's metric children, looked up once: `labels()` takes a lock and builds a
    key on every call."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.labels = _rpc_labels(name)
        self.unary = self.labels[0] in ("unary", "client_stream")
        self.started = metrics.started.labels(*self.labels)
        self.received = (
            metrics.msg_received.labels(*self.labels)
            if self.labels[0] in ("unary", "server_stream")
            else None
        )
        self.sent = metrics.msg_sent.labels(*self.labels)
        histogram = metrics.handling if self.unary else metrics.stream_handling
        self.duration = histogram.labels(*self.labels)
        self._handled_family = metrics.handled
        self._handled: dict[str, Any] = {}

    def handled(self, code: str) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._handled_family.labels(*self.labels, code)
        return child


class CallInterceptor(AsyncServerInterceptor):
    """Every call's one wrapper, in this order: takes or makes the correlation id and binds
    it (and later the tenant) to every log line; refuses an undecodable request; requires a
    valid x-tenant-id on OrchestratorService calls (health and reflection are open), and
    with API keys configured an `authorization: Bearer` key bound to that tenant; runs the
    handler; turns domain errors into precise statuses with google.rpc.Status details (and
    anything unexpected into INTERNAL, its traceback in the log and nothing of it on the
    wire); returns the correlation id in the headers with the answer (in the trailers of an
    error); writes one access-log line and the gRPC server metrics.

    One interceptor rather than one per concern: each layer costs grpc.aio an
    `intercept_service` and a handler per call, and a coroutine (or generator) per message."""

    def __init__(self, metrics: Metrics | None = None, keys: KeyRing | None = None) -> None:
        self._metrics = metrics
        self._keys = keys
        self._methods: dict[str, _MethodMetrics] = {}

    def _method_metrics(self, name: str) -> _MethodMetrics | None:
        if self._metrics is None:
            return None
        found = self._methods.get(name)
        if found is None:
            found = self._methods[name] = _MethodMetrics(self._metrics, name)
        return found

    def intercept(
        self, method: Callable[[Any, Context], Any], request: Any, context: Context, name: str
    ) -> Any:
        # Nothing of the handler runs yet: a coroutine or an async generator, not started.
        response = method(request, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, request, context, name)
        return self._unary(response, request, context, name)

    # ------------------------------------------------------------ the two shapes of call

    async def _unary(
        self, call: Coroutine[Any, Any, Any], request: Any, context: Context, name: str
    ) -> Any:
        state, started = self._begin(context, name)
        try:
            try:
                if isinstance(request, Undecodable):
                    raise request.problem()
                self._bind(context, name, state)
                response = await call
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, state)
            # Headers go with the answer, not before it: a call that fails is then
            # trailers-only, which a channel's retry policy may still retry (headers received
            # commit a call). Errors carry the id in their trailers.
            await context.send_initial_metadata((("x-correlation-id", state.correlation_id),))
            measured = self._method_metrics(name)
            if measured is not None:
                measured.sent.inc()
            return response
        finally:
            self._end(state, started, context)
            # A no-op once run; a call refused before it ran does not warn "never awaited".
            close = getattr(call, "close", None)
            if close is not None:
                close()

    async def _stream(
        self, items: AsyncIterator[Any], request: Any, context: Context, name: str
    ) -> AsyncIterator[Any]:
        state, started = self._begin(context, name)
        try:
            await context.send_initial_metadata((("x-correlation-id", state.correlation_id),))
            measured = self._method_metrics(name)
            sent = measured.sent if measured is not None else None
            try:
                if isinstance(request, Undecodable):
                    raise request.problem()
                self._bind(context, name, state)
                # An error raised mid-stream is answered like one raised before the first
                # message: precise code and details.
                async for item in items:
                    yield item
                    if sent is not None:
                        sent.inc()
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, state)
        finally:
            try:  # the handler's own clean-up first, as when it was the innermost layer
                close = getattr(items, "aclose", None)
                if close is not None:
                    await close()
            finally:
                self._end(state, started, context)

    # ------------------------------------------------------------ call context

    def _begin(self, context: Context, name: str) -> tuple[Call, float]:
        metadata = _call_metadata(context)
        correlation_id = metadata.get("x-correlation-id", "")[:128] or str(uuid.uuid4())
        call = Call(method=name, correlation_id=correlation_id, metadata=metadata)
        current_call.set(call)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        measured = self._method_metrics(name)
        if measured is not None:
            measured.started.inc()
            if measured.received is not None:
                measured.received.inc()
        return call, time.perf_counter()

    def _end(self, call: Call, started: float, context: Context) -> None:
        code = context.code()
        if code is None:
            code = call.code
        if isinstance(code, int):
            code = grpc.StatusCode.UNKNOWN
        elapsed = time.perf_counter() - started
        log.info(
            "rpc",
            method=call.method,
            code=code.name,
            duration_ms=round(elapsed * 1000, 3),
            tenant_id=call.tenant_id,
        )
        measured = self._method_metrics(call.method)
        if measured is not None:
            measured.handled(code.name).inc()
            measured.duration.observe(elapsed)

    # ------------------------------------------------------------ tenant

    def _bind(self, context: Context, name: str, call: Call) -> None:
        if not name.startswith(SERVICE_PREFIX):
            return
        tenant = _tenant(call.metadata.get("x-tenant-id", ""))
        if self._keys is not None:
            key = self._keys.authorize(call.metadata.get("authorization", ""), tenant)
            structlog.contextvars.bind_contextvars(api_key=key)
        call.tenant_id = tenant
        structlog.contextvars.bind_contextvars(tenant_id=tenant)

    # ------------------------------------------------------------ errors

    @staticmethod
    async def _fail(context: Context, exc: Exception, call: Call) -> NoReturn:
        if isinstance(exc, OrchestratorError):
            error = exc
        else:
            log.exception("rpc.internal_error")
            error = OrchestratorError("internal error", reason="INTERNAL_ERROR")
        code = getattr(grpc.StatusCode, error.code)
        call.code = code
        trailers: list[tuple[str, str | bytes]] = [
            ("grpc-status-details-bin", rich_status(code, error, call)),
            ("x-correlation-id", call.correlation_id),
        ]
        if error.retry_delay is not None:
            # RetryInfo for the caller's code; the same delay as gRPC's own server pushback,
            # which a channel retry policy (the client's Get/List) honours.
            trailers.append(("grpc-retry-pushback-ms", str(int(error.retry_delay * 1000))))
        await context.abort(
            code, _clip(error.message, MAX_MESSAGE), trailing_metadata=tuple(trailers)
        )


def call_tenant() -> str:
    """The tenant bound to the current call by CallInterceptor."""
    return current_call.get().tenant_id


def call_correlation_id() -> str:
    """The correlation id of the current call."""
    return current_call.get().correlation_id

"""Server interceptors, outermost first: call context (correlation id, access log), errors
(domain exceptions -> google.rpc.Status), tenant (x-tenant-id).

Written on grpc.aio.ServerInterceptor rather than grpc-interceptor's async base: that base
hands a server stream back unwrapped, so errors raised mid-stream would escape the error
interceptor.
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

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
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError on deep nesting
            return Undecodable(message_type.DESCRIPTOR.full_name, exc)

    return decode


@dataclass
class Call:
    """What the interceptors learned about the current call."""

    method: str
    correlation_id: str
    tenant_id: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK


current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("current_call")

Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


async def _items(
    inner: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    """A server-streaming handler's responses, whichever style it is written in: an async
    generator (ours), or a coroutine that writes with `context.write` (grpcio-health's
    Watch), which yields nothing here."""
    result = inner(request, context)
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour wrapped (our RPCs are unary-request only)."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kw)
    return handler


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Takes or makes the correlation id, binds it (and later the tenant) to every log line,
    returns it in initial metadata, and writes one access-log line (and metric) per call."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method

        def begin(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Call, float]:
            correlation_id = _metadata(context, "x-correlation-id")[:128] or str(uuid.uuid4())
            call = Call(method=method, correlation_id=correlation_id)
            current_call.set(call)
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
            return call, time.perf_counter()

        def end(call: Call, started: float, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            code = context.code() if context.code() is not None else call.code
            if isinstance(code, int):
                code = grpc.StatusCode.UNKNOWN
            elapsed = time.perf_counter() - started
            log.info(
                "rpc",
                method=method,
                code=code.name,
                duration_ms=round(elapsed * 1000, 3),
                tenant_id=call.tenant_id,
            )
            if self._metrics is not None:
                self._metrics.rpcs.labels(method, code.name).inc()
                self._metrics.rpc_latency.labels(method).observe(elapsed)

        def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                call, started = begin(context)
                try:
                    response = await inner(request, context)
                    # Headers go with the answer, not before it: a call that fails is then
                    # trailers-only, which a channel's retry policy may still retry (headers
                    # received commit a call). Errors carry the id in their trailers.
                    await context.send_initial_metadata(
                        (("x-correlation-id", call.correlation_id),)
                    )
                    return response
                finally:
                    end(call, started, context)

            return behaviour

        def stream(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                call, started = begin(context)
                await context.send_initial_metadata((("x-correlation-id", call.correlation_id),))
                try:
                    async for item in _items(inner, request, context):
                        yield item
                finally:
                    end(call, started, context)

            return behaviour

        return _rewrap(handler, unary, stream)


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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into precise statuses with google.rpc.Status details; anything
    unexpected becomes INTERNAL with the traceback in the log and nothing of it on the wire."""

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None

        async def fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
            call = current_call.get(None)
            if isinstance(exc, OrchestratorError):
                error = exc
            else:
                log.exception("rpc.internal_error")
                error = OrchestratorError("internal error", reason="INTERNAL_ERROR")
            code = getattr(grpc.StatusCode, error.code)
            if call is not None:
                call.code = code
            trailers: list[tuple[str, str | bytes]] = [
                ("grpc-status-details-bin", rich_status(code, error, call))
            ]
            if call is not None:
                trailers.append(("x-correlation-id", call.correlation_id))
            if error.retry_delay is not None:
                # RetryInfo for the caller's code; the same delay as gRPC's own server
                # pushback, which a channel retry policy (the client's Get/List) honours.
                trailers.append(("grpc-retry-pushback-ms", str(int(error.retry_delay * 1000))))
            await context.abort(
                code, _clip(error.message, MAX_MESSAGE), trailing_metadata=tuple(trailers)
            )

        def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    if isinstance(request, Undecodable):
                        raise request.problem()
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc)

            return behaviour

        def stream(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    if isinstance(request, Undecodable):
                        raise request.problem()
                    async for item in _items(inner, request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc)

            return behaviour

        return _rewrap(handler, unary, stream)


def tenant_from(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's tenant: x-tenant-id, a UUID, required on every OrchestratorService call."""
    raw = _metadata(context, "x-tenant-id").strip()
    if not raw:
        raise Unauthenticated("x-tenant-id metadata is required", reason="TENANT_REQUIRED")
    try:
        tenant = str(uuid.UUID(raw))
    except ValueError:
        raise InvalidArgument("x-tenant-id must be a UUID", reason="INVALID_TENANT_ID") from None
    return tenant


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Requires a valid x-tenant-id on OrchestratorService calls (health and reflection are
    open), and with API keys configured an `authorization: Bearer` key bound to that tenant;
    binds the tenant to the call and its log lines."""

    def __init__(self, keys: KeyRing | None = None) -> None:
        self._keys = keys

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler

        def bind(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            tenant = tenant_from(context)
            if self._keys is not None:
                key = self._keys.authorize(_metadata(context, "authorization"), tenant)
                structlog.contextvars.bind_contextvars(api_key=key)
            call = current_call.get(None)
            if call is not None:
                call.tenant_id = tenant
            structlog.contextvars.bind_contextvars(tenant_id=tenant)

        def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                bind(context)
                return await inner(request, context)

            return behaviour

        def stream(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                bind(context)
                async for item in _items(inner, request, context):
                    yield item

            return behaviour

        return _rewrap(handler, unary, stream)


def call_tenant() -> str:
    """The tenant bound to the current call by TenantInterceptor."""
    return current_call.get().tenant_id


def call_correlation_id() -> str:
    """The correlation id of the current call."""
    return current_call.get().correlation_id

"""OrchestratorService over Connect (JSON and binary) and gRPC-Web, for browsers.

The same servicer and the same interceptor objects as the gRPC port: each call gets an
`HttpCallContext`, which gives the interceptors what they read of a grpc.aio context (the
metadata, the deadline, the status) from the HTTP request, and turns their `abort` (a
`google.rpc.Status` in `grpc-status-details-bin`) into a Connect error with the same details.
The service object is built from the service descriptor, so an RPC added to the proto is
served here as soon as its code is generated.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf import json_format
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import status_pb2
from protobuf.wkt import Any as AnyDetail

from orchestrator.server.api.interceptors import CallInterceptor, Undecodable, decoder
from orchestrator.server.api.servicer import OrchestratorServicer, message_class
from orchestrator.v1 import orchestrator_connect
from orchestrator.v1 import orchestrator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["OrchestratorService"]
# Headers an HTTP client sends that are not call metadata.
_TRANSPORT_HEADERS = frozenset(
    (
        "content-type",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "connect-protocol-version",
        "connect-timeout-ms",
        "connect-content-encoding",
        "connect-accept-encoding",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "host",
        "connection",
        "te",
    )
)


class Aborted(grpc.aio.AbortError):
    """What `HttpCallContext.abort` raises: the status the CallInterceptor chose."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: Sequence[Any]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = tuple(trailers)

    def connect_error(self) -> ConnectError:
        """The same status in Connect's terms: code, message and the google.rpc.Status
        details (ErrorInfo, BadRequest, RetryInfo)."""
        details: list[ErrorDetail] = []
        for key, value in self.trailers:
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                details = [
                    ErrorDetail(AnyDetail(type_url=d.type_url, value=d.value))
                    for d in status.details
                ]
        return ConnectError(connect_code(self.code), self.message, details)


def connect_code(code: grpc.StatusCode) -> Code:
    """gRPC's status code as Connect's (the same names; gRPC spells CANCELLED with two Ls)."""
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code(code.name.lower())


class HttpCallContext:
    """The part of `grpc.aio.ServicerContext` the interceptors and the servicer use, read
    from and written to a Connect request's context."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._ctx = ctx
        self._code: grpc.StatusCode | None = None
        self._metadata = tuple(
            (key.lower(), value)
            for key, value in ctx.request_headers.allitems()
            if key.lower() not in _TRANSPORT_HEADERS and not key.lower().endswith("-bin")
        )

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        remaining = self._ctx.timeout_ms
        return None if remaining is None else max(remaining / 1000, 0.0)

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        for key, value in metadata:
            self._ctx.response_headers[key] = value

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> None:
        self._code = code
        for key, value in trailing_metadata:
            if isinstance(value, str) and not key.startswith("grpc-"):
                self._ctx.response_headers[key] = value
        raise Aborted(code, details, trailing_metadata)


class Frame:
    """A watch frame as the control plane made it: serialized once for every watcher. The
    binary codec sends its bytes as they are; JSON parses them once, for this caller."""

    __slots__ = ("data", "message_type")

    def __init__(self, data: bytes, message_type: Any) -> None:
        self.data = data
        self.message_type = message_type


class BinaryCodec:
    """application/proto: frames pass through; undecodable requests become `Undecodable`,
    which the CallInterceptor answers INVALID_ARGUMENT with a field violation, as on gRPC."""

    def name(self) -> str:
        return "proto"

    def encode(self, message: Any) -> bytes:
        if isinstance(message, Frame):
            return message.data
        data: bytes = message.SerializeToString()
        return data

    def decode(self, data: bytes | bytearray, message_class: Any) -> Any:
        return decoder(message_class)(bytes(data))


class JsonCodec:
    """application/json, proto3's JSON mapping (unknown fields are an error, as a typo in a
    field name should be)."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Any) -> bytes:
        if isinstance(message, Frame):
            message = message.message_type.FromString(message.data)
        return json_format.MessageToJson(message, indent=None).encode()

    def decode(self, data: bytes | bytearray, message_class: Any) -> Any:
        try:
            return json_format.Parse(bytes(data), message_class())
        except Exception as exc:  # ParseError, RecursionError, UnicodeDecodeError
            return Undecodable(message_class.DESCRIPTOR.full_name, exc)


def snake_case(name: str) -> str:
    """A method's name as protoc-gen-connectrpc spells it on the service protocol."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])|(?<=[A-Z])([A-Z])(?=[a-z])", r"_\1\2", name).lower()


Handler = Callable[[Any, Any], Any]


class ConnectService:
    """Every method of OrchestratorService, under the names the generated Connect
    application asks for, each running the gRPC port's interceptors and servicer."""

    def __init__(self, servicer: OrchestratorServicer, interceptors: Sequence[CallInterceptor]):
        self._methods: dict[str, Callable[..., Any]] = {}
        for method in SERVICE.methods:
            chained = _chain(
                getattr(servicer, method.name),
                interceptors,
                _path(method),
                method.server_streaming,
            )
            make = _stream if method.server_streaming else _unary
            self._methods[snake_case(method.name)] = make(chained, method)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self._methods[name]
        except KeyError:
            raise AttributeError(name) from None


def _path(method: MethodDescriptor) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


def _chain(
    handler: Handler, interceptors: Sequence[CallInterceptor], name: str, streaming: bool
) -> Handler:
    """The handler wrapped as grpc-interceptor would: the first interceptor outermost, and
    each inner layer started only when the outer one awaits it (so a call refused before it
    runs leaves no handler coroutine never awaited)."""
    for interceptor in reversed(interceptors):
        if streaming:

            async def stream(
                request: Any, context: Any, inner: Handler = handler, i: Any = interceptor
            ) -> AsyncIterator[Any]:
                async for item in i.intercept(inner, request, context, name):
                    yield item

            handler = stream
        else:

            async def unary(
                request: Any, context: Any, inner: Handler = handler, i: Any = interceptor
            ) -> Any:
                return await i.intercept(inner, request, context, name)

            handler = unary
    return handler


def _unary(call: Handler, method: MethodDescriptor) -> Callable[..., Any]:
    async def unary(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        try:
            return await call(request, HttpCallContext(ctx))
        except Aborted as err:
            raise err.connect_error() from None

    return unary


def _stream(call: Handler, method: MethodDescriptor) -> Callable[..., Any]:
    output = message_class(method.output_type.full_name)

    async def stream(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in call(request, HttpCallContext(ctx)):
                yield Frame(item, output) if isinstance(item, bytes) else item
        except Aborted as err:
            raise err.connect_error() from None

    return stream


def connect_application(
    servicer: OrchestratorServicer,
    interceptors: Sequence[CallInterceptor],
    max_request_bytes: int,
) -> orchestrator_connect.OrchestratorServiceASGIApplication:
    """The generated ASGI application of the service, over our service object and codecs."""
    service = cast(orchestrator_connect.OrchestratorService, ConnectService(servicer, interceptors))
    return orchestrator_connect.OrchestratorServiceASGIApplication(
        service,
        read_max_bytes=max_request_bytes,
        codecs=[BinaryCodec(), JsonCodec()],
    )

"""Typed errors: one exception class per gRPC status code, carrying the server's details.

The server sends a `google.rpc.Status` in the `grpc-status-details-bin` trailer: an `ErrorInfo`
(reason, domain, metadata) and, for validation failures, `BadRequest` field violations. A
failed call becomes the `OrchestratorError` subclass of its code with those details unpacked,
like `google.api_core.exceptions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request, e.g. `executable_plan.flows[0].steps[2].tool`."""

    field: str
    description: str


class OrchestratorError(Exception):
    """A failed call: its gRPC code, message, AIP-193 reason, domain, metadata and violations."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    @property
    def code_name(self) -> str:
        """The code's name, e.g. `NOT_FOUND`."""
        return self.code.name

    @property
    def correlation_id(self) -> str:
        """The correlation id of the failed call, when the server named it."""
        return self.metadata.get("correlation_id", "")

    def __str__(self) -> str:
        head = f"{self.code_name} {self.reason}" if self.reason else self.code_name
        return f"{head}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code_name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r}, "
            f"violations={list(self.violations)!r})"
        )


class Cancelled(OrchestratorError):
    """CANCELLED: the call was cancelled, usually by the caller."""

    code = grpc.StatusCode.CANCELLED


class Unknown(OrchestratorError):
    """UNKNOWN: an error the server did not classify."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(OrchestratorError):
    """INVALID_ARGUMENT: the request (or plan) is invalid; `violations` says where."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(OrchestratorError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(OrchestratorError):
    """NOT_FOUND: no such run (or clarification) for this tenant."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrchestratorError):
    """ALREADY_EXISTS: e.g. an idempotency key reused for another request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(OrchestratorError):
    """PERMISSION_DENIED: the caller or the plan may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OrchestratorError):
    """RESOURCE_EXHAUSTED: a quota or limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(OrchestratorError):
    """FAILED_PRECONDITION: not allowed in the run's current state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(OrchestratorError):
    """ABORTED: a concurrency conflict; the call may be retried."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(OrchestratorError):
    """OUT_OF_RANGE: e.g. a watch after the run's last event."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(OrchestratorError):
    """UNIMPLEMENTED: the server does not offer this method."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(OrchestratorError):
    """INTERNAL: the server failed; details are only in its log."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(OrchestratorError):
    """UNAVAILABLE: the server cannot be reached or is shutting down; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(OrchestratorError):
    """DATA_LOSS: unrecoverable data loss."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(OrchestratorError):
    """UNAUTHENTICATED: no (valid) tenant or credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


EXCEPTION_BY_CODE: dict[grpc.StatusCode, type[OrchestratorError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def from_status(code: grpc.StatusCode, message: str, status: Any = None) -> OrchestratorError:
    """The exception for `code`, with the details of a `google.rpc.Status` (or none)."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = EXCEPTION_BY_CODE.get(code, OrchestratorError)
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=violations,
    )


def _status_in(trailing: Iterable[tuple[str, str | bytes]] | None) -> Any:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def from_aio_error(err: grpc.aio.AioRpcError) -> OrchestratorError:
    """The typed exception of a failed grpc.aio call (details read from its trailers)."""
    trailing = err.trailing_metadata()
    pairs = [(str(k), v) for k, v in trailing] if trailing is not None else None
    return from_status(err.code(), err.details() or "", _status_in(pairs))


def from_call_error(err: grpc.RpcError) -> OrchestratorError:
    """The typed exception of a failed synchronous call (details via `rpc_status.from_call`)."""
    if isinstance(err, grpc.aio.AioRpcError):
        return from_aio_error(err)
    if not isinstance(err, grpc.Call):
        return Unknown(str(err) or type(err).__name__)
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        # Code or message disagree with the trailer (a proxy rewrote the status): keep the
        # call's code and message, and still take the details.
        status = _status_in(err.trailing_metadata())
    return from_status(err.code(), err.details() or "", status)

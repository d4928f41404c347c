"""Domain exceptions. Each carries a gRPC status code name, an AIP-193 reason and details.

Domain code raises these; the error interceptor turns them into a `google.rpc.Status`.
Nothing here imports grpc: the code is the name of a `grpc.StatusCode` member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DOMAIN = "orchestrator.v1"


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request, e.g. `executable_plan.flows[0].steps[2].tool`."""

    field: str
    description: str


class OrchestratorError(Exception):
    """Base of every error a caller may see: a code, a reason and structured details."""

    code: str = "INTERNAL"
    reason: str = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[FieldViolation] = list(violations)
        # When set, the caller may retry after this many seconds (a google.rpc.RetryInfo).
        self.retry_delay: float | None = None


class InvalidArgument(OrchestratorError):
    """The request is malformed (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class ValidationFailed(InvalidArgument):
    """The plan or request failed validation; one violation per problem."""

    reason = "VALIDATION_FAILED"


class Unauthenticated(OrchestratorError):
    """The caller did not say who it is (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"
    reason = "TENANT_REQUIRED"


class PermissionDenied(OrchestratorError):
    """The caller or the plan may not do this (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class NotFound(OrchestratorError):
    """No such run for this tenant (NOT_FOUND)."""

    code = "NOT_FOUND"
    reason = "EXECUTION_NOT_FOUND"


class AlreadyExists(OrchestratorError):
    """A unique thing exists already, e.g. an idempotency key used for another request."""

    code = "ALREADY_EXISTS"
    reason = "IDEMPOTENCY_KEY_REUSED"


class InvalidTransition(OrchestratorError):
    """The run is not in a state that allows the requested transition (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"
    reason = "INVALID_TRANSITION"


class FailedPrecondition(OrchestratorError):
    """The request is valid but the system is not in a state to accept it."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class OutOfRange(OrchestratorError):
    """A position beyond what exists, e.g. a watch after the last event (OUT_OF_RANGE)."""

    code = "OUT_OF_RANGE"
    reason = "SEQUENCE_OUT_OF_RANGE"


class ResourceExhausted(OrchestratorError):
    """A quota or limit was reached (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "QUOTA_EXCEEDED"


class Unavailable(OrchestratorError):
    """The server is shutting down or cannot serve now (UNAVAILABLE)."""

    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"


class StoreUnavailable(Unavailable):
    """The store cannot be reached now (a network cut, a restart, a failover): nothing was
    written; the call may be repeated after `retry_delay` seconds (a google.rpc.RetryInfo)."""

    reason = "STORE_UNAVAILABLE"

    def __init__(
        self,
        message: str = "the store is unreachable; retry shortly",
        *,
        retry_delay: float = 0.5,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_delay = retry_delay


class StoreFull(ResourceExhausted):
    """The store has no room for the write (disk or database full); reads still work."""

    reason = "STORE_FULL"

    def __init__(
        self,
        message: str = "the store is full; retry once space is freed",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_delay = 5.0


# Weather, not errors of a run: the engine waits these out, callers may retry.
StoreOutage = StoreUnavailable | StoreFull
STORE_OUTAGES = (StoreUnavailable, StoreFull)


class Conflict(Exception):
    """A compare-and-set lost: the row changed since it was read. Retried by the store."""


class PortUnavailable(Exception):
    """The server's address could not be bound: another process serves it (SO_REUSEPORT is
    off, so a second server never shares a port) or the host has no such address."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"cannot listen on {address}: the port is in use by another process "
            "(or the address is not this host's)"
        )
        self.address = address

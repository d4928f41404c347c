"""Resuming a run's event stream: where a watcher is, what it has seen, when to reconnect."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from orchestrator.client.errors import OrchestratorError
from orchestrator.client.messages import TERMINAL, is_terminal_event
from orchestrator.v1 import orchestrator_pb2 as pb

# Execute with an idempotency key is retried on UNAVAILABLE this many times in all: the key
# makes a repeat return the first run, never a second one.
EXECUTE_ATTEMPTS = 5
# A watch gives up when it could not reconnect for this long (None: keeps trying).
RECONNECT_TIMEOUT = 120.0

# Transport failures that gRPC reports as INTERNAL, UNKNOWN or CANCELLED when a connection
# or a stream is torn down under a call (server killed, proxy restarted, GOAWAY).
_DROPPED = (
    "stream removed",
    "rst_stream",
    "goaway",
    "connection reset",
    "socket closed",
    "broken pipe",
    "connection refused",
    "failed to connect",
    "end of tcp stream",
)


def is_transient(error: OrchestratorError) -> bool:
    """Whether a failed watch stream may be reopened where it stopped.

    UNAVAILABLE always (server restarting or draining); DEADLINE_EXCEEDED (a proxy's stream
    timeout; the caller's own deadline is checked separately); INTERNAL, UNKNOWN or CANCELLED
    only when it is the transport that failed, never when the server sent a reason.
    """
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    if error.code in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    ):
        text = error.message.lower()
        return not error.reason and any(marker in text for marker in _DROPPED)
    return False


@dataclass
class Backoff:
    """Exponential back-off with jitter: each delay is drawn from [d/2, d], d doubling up to
    `maximum`; `reset` once a call got through."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        """The next delay to sleep, in seconds."""
        current = self._next
        self._next = min(self.maximum, current * self.multiplier)
        return random.uniform(current / 2, current)

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class WatchCursor:
    """A watcher's place in one run's event log: it decides which received event the caller
    sees, so that reconnecting never shows an event twice."""

    position: int = 0
    heartbeats: bool = False
    from_start: bool = False  # from position 0: the whole history, not a SNAPSHOT
    done: bool = False

    def request(self, run_id: str) -> pb.WatchExecutionRequest:
        """The request that (re)opens the stream where the watcher is."""
        return pb.WatchExecutionRequest(
            run_id=run_id,
            after_sequence=self.position,
            from_start=self.from_start and self.position == 0,
        )

    def accept(self, event: pb.ExecutionEvent) -> bool:
        """Record `event`; True when the caller should see it."""
        if event.type == pb.EVENT_TYPE_HEARTBEAT:
            return self.heartbeats
        if event.type == pb.EVENT_TYPE_SNAPSHOT:
            # The run as of `sequence` (first connect, or a resync after pruning).
            self.position = event.sequence
            self.done = event.execution.status in TERMINAL
            return True
        if event.sequence <= self.position:
            return False
        self.position = event.sequence
        self.done = is_terminal_event(event)
        return True


@dataclass
class WatchRetry:
    """When a watch reopens its stream: the caller's overall `timeout`, back-off between
    attempts, and giving up after `reconnect_timeout` seconds without getting through."""

    run_id: str
    timeout: float | None = None
    reconnect_timeout: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    _deadline: float | None = field(default=None, init=False)
    _failing_since: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.timeout is not None:
            self._deadline = time.monotonic() + self.timeout

    def _expired(self) -> TimeoutError:
        return TimeoutError(f"run {self.run_id} did not finish within {self.timeout} s")

    def remaining(self) -> float | None:
        """Seconds left of the caller's timeout (None: no timeout); TimeoutError when none."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._expired()
        return left

    def received(self) -> None:
        """A message got through: the connection works again."""
        self.backoff.reset()
        self._failing_since = None

    def failed(self, error: OrchestratorError) -> float:
        """The delay before reopening after `error`; raises it (or TimeoutError) instead
        when the stream should not be reopened."""
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline - 0.01:
            raise self._expired() from error
        if not is_transient(error):
            raise error
        if self._failing_since is None:
            self._failing_since = now
        elif self.reconnect_timeout is not None and (
            now - self._failing_since > self.reconnect_timeout
        ):
            raise error
        delay = self.backoff.delay()
        left = self.remaining()
        return delay if left is None else min(delay, left)

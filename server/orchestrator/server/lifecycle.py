"""The run and step state machines, as data: one table of allowed transitions."""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    """Lifecycle state of a run (DESIGN §4); values are what the store keeps."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class StepStatus(enum.StrEnum):
    """State of one step of a run."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"
    WAITING = "WAITING"

    @property
    def finished(self) -> bool:
        return self in STEP_FINISHED


class Action(enum.StrEnum):
    """What moves a run from one status to another: callers' controls and the engine's moves."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    COMPLETE = "complete"
    FAIL = "fail"
    RETRY = "retry"


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
STEP_FINISHED = frozenset(
    {StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED}
)

# (from, action) -> to. Anything absent is refused. A run paused before it started resumes
# as RUNNING (the engine then starts it), like the seed's lifecycle.
TRANSITIONS: dict[tuple[RunStatus, Action], RunStatus] = {
    (RunStatus.PENDING, Action.START): RunStatus.RUNNING,
    (RunStatus.PENDING, Action.PAUSE): RunStatus.PAUSED,
    (RunStatus.RUNNING, Action.PAUSE): RunStatus.PAUSED,
    (RunStatus.PAUSED, Action.RESUME): RunStatus.RUNNING,
    (RunStatus.PENDING, Action.CANCEL): RunStatus.CANCELLED,
    (RunStatus.RUNNING, Action.CANCEL): RunStatus.CANCELLED,
    (RunStatus.PAUSED, Action.CANCEL): RunStatus.CANCELLED,
    (RunStatus.RUNNING, Action.COMPLETE): RunStatus.COMPLETED,
    (RunStatus.PENDING, Action.FAIL): RunStatus.FAILED,
    (RunStatus.RUNNING, Action.FAIL): RunStatus.FAILED,
    (RunStatus.PAUSED, Action.FAIL): RunStatus.FAILED,
    # RetryExecution: a finished run goes on in place. A COMPLETED run only with steps named
    # to run again (the store checks that), else there is nothing to retry.
    (RunStatus.FAILED, Action.RETRY): RunStatus.RUNNING,
    (RunStatus.CANCELLED, Action.RETRY): RunStatus.RUNNING,
    (RunStatus.COMPLETED, Action.RETRY): RunStatus.RUNNING,
}

# The reason a refused control call reports (DESIGN §4).
REFUSAL_REASONS: dict[Action, str] = {
    Action.PAUSE: "PAUSE_FAILED",
    Action.RESUME: "RESUME_FAILED",
    Action.CANCEL: "CANCEL_FAILED",
    Action.RETRY: "RETRY_FAILED",
}


def next_status(current: RunStatus, action: Action) -> RunStatus | None:
    """The status `action` leads to from `current`, or None when the move is not allowed."""
    return TRANSITIONS.get((current, action))

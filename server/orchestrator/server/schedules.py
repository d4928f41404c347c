"""Schedules in domain terms: when one fires (cron or interval, in a time zone), what its
overlap policy does, and the checks of a Schedule a caller sends. No store, no gRPC."""

from __future__ import annotations

import enum
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from orchestrator.server.errors import FieldViolation, ValidationFailed
from orchestrator.server.labels import NAME, label_violations
from orchestrator.v1 import orchestrator_pb2 as pb

MIN_INTERVAL = 1.0
# Unset catchup_window: fire times missed for up to a minute are still run.
DEFAULT_CATCHUP = 60.0
MIN_CATCHUP = 1.0
# The label every run of a schedule carries (DESIGN §9).
SCHEDULE_LABEL = "schedule_id"
# How many next fire times a Schedule message shows, and recent actions.
SHOWN_FIRES = 5
SHOWN_ACTIONS = 10
# Counting missed cron fire times walks them; past this many the count stops growing.
MAX_COUNTED = 100_000


class Overlap(enum.Enum):
    """What a fire time does while the schedule's last run is still going."""

    SKIP = "SKIP"
    BUFFER_ONE = "BUFFER_ONE"
    ALLOW_ALL = "ALLOW_ALL"
    CANCEL_OTHER = "CANCEL_OTHER"


OVERLAP_PB = {o: pb.OverlapPolicy.Value(f"OVERLAP_POLICY_{o.value}") for o in Overlap}
PB_OVERLAP = {v: k for k, v in OVERLAP_PB.items()}
PB_OVERLAP[pb.OVERLAP_POLICY_UNSPECIFIED] = Overlap.SKIP


class Decision(enum.Enum):
    """What one fire time does."""

    START = "START"
    SKIP = "SKIP"
    BUFFER = "BUFFER"
    CANCEL_AND_START = "CANCEL_AND_START"


def decide(policy: Overlap, running: bool, buffered: bool) -> Decision:
    """The overlap policy as a table: a fire time with the last run still going (`running`)
    and, for BUFFER_ONE, a fire time already waiting (`buffered`)."""
    if not running or policy is Overlap.ALLOW_ALL:
        return Decision.START
    if policy is Overlap.CANCEL_OTHER:
        return Decision.CANCEL_AND_START
    if policy is Overlap.BUFFER_ONE and not buffered:
        return Decision.BUFFER
    return Decision.SKIP


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: a five-field cron in a zone, or every `interval` seconds
    (aligned to the Unix epoch, so every replica computes the same fire times)."""

    cron: str = ""
    interval: float = 0.0
    zone: str = "UTC"

    def next_after(self, after: float) -> float:
        """The first fire time strictly after `after` (epoch seconds)."""
        if self.interval:
            step = math.floor(after / self.interval) + 1
            # (k * interval) / interval can round below k: never answer `after` itself.
            while step * self.interval <= after:
                step += 1
            return float(step * self.interval)
        start = datetime.fromtimestamp(after, ZoneInfo(self.zone))
        return next(iter(CronSim(self.cron, start))).timestamp()

    def upcoming(self, after: float, count: int) -> list[float]:
        """The next `count` fire times after `after`."""
        times: list[float] = []
        for _ in range(count):
            after = self.next_after(after)
            times.append(after)
        return times

    def count_between(self, first: float, last: float) -> int:
        """How many fire times lie in [first, last], `first` being one of them."""
        if last < first:
            return 0
        if self.interval:
            return math.floor((last - first) / self.interval + 1e-9) + 1
        count, at = 0, first
        while at <= last and count < MAX_COUNTED:
            count += 1
            at = self.next_after(at)
        return count


def timing_of(schedule: pb.Schedule, violations: list[FieldViolation]) -> Timing | None:
    """The schedule's timing; a violation per bad field (cron, interval, timezone)."""
    zone = schedule.timezone or "UTC"
    good = True
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        violations.append(
            FieldViolation("schedule.timezone", f"{zone[:80]!r} is not an IANA time zone")
        )
        good = False
    has_interval = schedule.HasField("interval")
    if bool(schedule.cron) == has_interval:
        violations.append(
            FieldViolation(
                "schedule.cron" if schedule.cron else "schedule.interval",
                "exactly one of cron and interval is required",
            )
        )
        return None
    if has_interval:
        seconds = schedule.interval.ToNanoseconds() / 1e9
        if not seconds >= MIN_INTERVAL:
            violations.append(
                FieldViolation("schedule.interval", f"must be at least {MIN_INTERVAL:g}s")
            )
            return None
        return Timing(interval=seconds, zone=zone) if good else None
    if len(schedule.cron.split()) != 5:
        violations.append(
            FieldViolation(
                "schedule.cron", "must have five fields: minute hour day-of-month month weekday"
            )
        )
        return None
    try:
        CronSim(schedule.cron, datetime.now(UTC))
    except CronSimError as exc:
        violations.append(FieldViolation("schedule.cron", f"not a cron expression: {exc}"))
        return None
    return Timing(cron=schedule.cron, zone=zone) if good else None


def timing_from_spec(spec: pb.Schedule) -> Timing:
    """The timing of a stored (already checked) schedule."""
    if spec.HasField("interval"):
        return Timing(interval=spec.interval.ToNanoseconds() / 1e9, zone=spec.timezone or "UTC")
    return Timing(cron=spec.cron, zone=spec.timezone or "UTC")


def catchup_of(spec: pb.Schedule) -> float:
    """How old a missed fire time may be and still run, in seconds."""
    if spec.HasField("catchup_window"):
        return spec.catchup_window.ToNanoseconds() / 1e9
    return DEFAULT_CATCHUP


def check_schedule(schedule: pb.Schedule, *, creating: bool) -> tuple[pb.Schedule, Timing]:
    """The schedule's definition (output-only fields cleared, an id made when creating
    without one) and its timing; ValidationFailed with one violation per problem."""
    violations: list[FieldViolation] = []
    spec = pb.Schedule()
    spec.CopyFrom(schedule)
    for name in (
        "recent_actions",
        "next_fire_times",
        "created_at",
        "updated_at",
        "started_count",
        "skipped_count",
        "missed_count",
    ):
        spec.ClearField(name)
    if not spec.schedule_id and creating:
        spec.schedule_id = str(uuid.uuid4())
    check_schedule_id(spec.schedule_id, violations, "schedule.schedule_id")
    timing = timing_of(spec, violations)
    if spec.overlap_policy not in PB_OVERLAP:
        violations.append(FieldViolation("schedule.overlap_policy", "not an OverlapPolicy"))
    if spec.HasField("catchup_window") and not catchup_of(spec) >= MIN_CATCHUP:
        violations.append(
            FieldViolation("schedule.catchup_window", f"must be at least {MIN_CATCHUP:g}s")
        )
    if not spec.plan_hash and not spec.HasField("executable_plan"):
        violations.append(
            FieldViolation("schedule.plan_hash", "a plan_hash or an executable_plan is required")
        )
    violations += label_violations(spec.labels, "schedule.labels")
    if SCHEDULE_LABEL in spec.labels:
        violations.append(
            FieldViolation(
                f"schedule.labels[{SCHEDULE_LABEL!r}]", "is set by the server on every run"
            )
        )
    if violations or timing is None:
        raise ValidationFailed("invalid schedule", violations=violations)
    return spec, timing


def check_schedule_id(schedule_id: str, violations: list[FieldViolation], path: str) -> None:
    """A schedule id is a label value (its runs carry it as `schedule_id=<id>`)."""
    if not schedule_id:
        violations.append(FieldViolation(path, "required"))
    elif not NAME.fullmatch(schedule_id):
        violations.append(
            FieldViolation(
                path,
                'at most 63 characters, [A-Za-z0-9] at both ends, "-", "_", "." inside',
            )
        )

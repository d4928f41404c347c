"""Schedule timing and the overlap table, without a server: fire times in time zones across
daylight saving changes, epoch-aligned intervals, and what each policy does."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.server.schedules import Decision, Overlap, Timing, decide


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def local(seconds: float, zone: str) -> str:
    return datetime.fromtimestamp(seconds, ZoneInfo(zone)).isoformat()


def test_cron_fires_at_the_wall_clock_time_of_its_zone_across_dst() -> None:
    paris = Timing(cron="30 2 * * *", zone="Europe/Paris")
    # 2026-03-29: Paris skips 02:00-03:00; cron's 02:30 does not exist that day, and the job
    # runs once as the clock jumps (cronsim follows Debian cron here), not twice, not never.
    fires = paris.upcoming(at("2026-03-27T12:00:00", "Europe/Paris"), 4)
    assert [local(t, "Europe/Paris") for t in fires] == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]
    # 2026-10-25: Paris lives 02:00-03:00 twice; a daily 02:30 still fires once.
    fires = paris.upcoming(at("2026-10-24T12:00:00", "Europe/Paris"), 2)
    assert [local(t, "Europe/Paris") for t in fires] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    nine = Timing(cron="0 9 * * 1-5", zone="America/New_York")
    first = nine.next_after(at("2026-11-06T10:00:00", "America/New_York"))  # a Friday
    assert local(first, "America/New_York") == "2026-11-09T09:00:00-05:00"
    assert datetime.fromtimestamp(first, UTC).hour == 14


def test_intervals_are_aligned_to_the_epoch() -> None:
    minute = Timing(interval=60.0)
    assert minute.next_after(at("2026-12-01T23:10:33")) == at("2026-12-01T23:11:00")
    assert minute.next_after(at("2026-12-01T23:11:00")) == at("2026-12-01T23:12:00")
    assert minute.count_between(at("2026-12-01T23:00:00"), at("2026-12-01T23:59:59")) == 60


@given(
    interval=st.floats(min_value=1.0, max_value=86_400.0),
    start=st.floats(min_value=0.0, max_value=4e9),
)
def test_the_next_fire_time_is_always_later(interval: float, start: float) -> None:
    timing = Timing(interval=interval)
    first = timing.next_after(start)
    second = timing.next_after(first)
    assert start < first < second
    assert second - first == pytest.approx(interval, rel=1e-6)


@pytest.mark.parametrize(
    "policy,running,buffered,decision",
    [
        (Overlap.SKIP, False, False, Decision.START),
        (Overlap.SKIP, True, False, Decision.SKIP),
        (Overlap.BUFFER_ONE, True, False, Decision.BUFFER),
        (Overlap.BUFFER_ONE, True, True, Decision.SKIP),
        (Overlap.BUFFER_ONE, False, True, Decision.START),
        (Overlap.ALLOW_ALL, True, False, Decision.START),
        (Overlap.CANCEL_OTHER, True, False, Decision.CANCEL_AND_START),
        (Overlap.CANCEL_OTHER, False, False, Decision.START),
    ],
)
def test_the_overlap_table(
    policy: Overlap, running: bool, buffered: bool, decision: Decision
) -> None:
    assert decide(policy, running, buffered) is decision

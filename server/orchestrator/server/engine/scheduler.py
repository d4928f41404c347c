"""The engine: one asyncio task per active run, scheduling its steps (DESIGN §3-4).

The store is the truth. A run's task keeps a copy of its steps' states, changes them only
through the journal, and follows control calls (pause, resume, cancel, answers) that the
control plane commits and then tells it about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import trace

from orchestrator.server import sandbox
from orchestrator.server.engine import secrets
from orchestrator.server.engine.slots import DEFAULT_PRIORITY, FairSlots
from orchestrator.server.errors import STORE_OUTAGES, OrchestratorError
from orchestrator.server.expressions import DEFAULT_BUDGET_SECONDS, ExpressionError, Scope, scope
from orchestrator.server.lifecycle import Action, RunStatus, StepStatus
from orchestrator.server.metrics import Metrics
from orchestrator.server.plan import (
    StepInfo,
    ValidatedPlan,
    ValidationCache,
    finite,
    json_depth,
    more_nodes_than,
    validate_request,
)
from orchestrator.server.sandbox import Sandbox
from orchestrator.server.security import TenantPolicy
from orchestrator.server.store.journal import (
    Ending,
    Journal,
    LeaseLost,
    Link,
    Outcome,
    Parking,
    Started,
    StepStart,
    Taken,
)
from orchestrator.server.store.records import Answer, Inserted
from orchestrator.server.tools import Tool, ToolContext, ToolError, ToolRegistry
from orchestrator.server.tracing import parent_context
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = Any
log = structlog.get_logger("orchestrator.engine")

FINISHED = frozenset(
    {StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED}
)
CATEGORIES = {
    "input": "INPUT",
    "multiple_choice": "MULTIPLE_CHOICE",
    "value_confirmation": "VALUE_CONFIRMATION",
    "user_verification": "USER_VERIFICATION",
    "action": "ACTION",
    "custom": "CUSTOM",
}


@dataclass(frozen=True)
class Retry:
    """A step's retry policy with defaults filled in."""

    max_attempts: int = 1
    initial_delay: float = 1.0
    max_delay: float = 60.0
    base: float = 2.0
    jitter: bool = False

    def delay(self, attempt: int) -> float:
        """Delay before the attempt after `attempt` (1-based), capped, with full jitter."""
        delay = min(self.max_delay, self.initial_delay * self.base ** (attempt - 1))
        return random.uniform(0, delay) if self.jitter else delay

    @classmethod
    def of(cls, policy: pb.RetryPolicy | None, default: pb.RetryPolicy | None) -> Retry:
        chosen = policy if policy is not None and policy.ByteSize() else default
        if chosen is None or not chosen.ByteSize():
            return cls()
        initial = (
            chosen.initial_delay.ToNanoseconds() / 1e9 if chosen.HasField("initial_delay") else 1.0
        )
        ceiling = chosen.max_delay.ToNanoseconds() / 1e9 if chosen.HasField("max_delay") else 60.0
        return cls(
            max_attempts=max(1, chosen.max_attempts or 1),
            initial_delay=initial,
            max_delay=max(ceiling, 0.0),
            base=chosen.exponential_base or 2.0,
            jitter=chosen.jitter,
        )


@dataclass
class Attempt:
    """How one attempt of a step ended: an outcome that finishes the step (already committed
    when `recorded`), or none and the error of an attempt that is tried again; `again`: the
    attempt must be made afresh."""

    started: Started
    outcome: Outcome | None = None
    variables: Mapping[str, JSON] | None = None
    recorded: bool = False
    retry_error: str = ""
    again: bool = False


def _next_attempt(row: Mapping[str, Any], at: float) -> Started:
    """The attempt a step's next start at `at` makes, as its row (the store's) counts."""
    return Started(
        row["attempts"] + 1, row["first_started_at"] or at, int(row["attempts_before"] or 0)
    )


class _Dropped(Exception):
    """The store refused the held links (`RunTask._write_held`): the run no longer takes
    them. The task's copy is back to what the store has; the step task ends and the
    scheduling loop goes on from there."""


class StepFailed(Exception):
    """A step ended FAILED (already recorded)."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(error)
        self.reason = reason


# Runs one claim takes at a time: small, so that replicas woken together share new runs.
CLAIM_BATCH = 8
# Claims look for due runs at least this often (runs parked by a replica that died are
# claimed by the others when due, within this).
CLAIM_POLL_SECONDS = 1.0
# A run waiting on its concurrency key asks again this often at the latest (a notice from
# the replica where a run with the key ended wakes it at once).
KEY_RECHECK_SECONDS = 5.0
# A run adopted at accept (Engine.adopt) counts against its tenant's free slots this long at
# most, unless its first step takes a slot (or its task ends) sooner.
ADOPTED_FOR = 1.0


@dataclass(frozen=True)
class Idle:
    """What an in-flight step waits for while it does nothing (a pause, when all is unset)."""

    until: float | None = None  # a timer: a back-off, core.wait, a signal's deadline
    clarification_id: str = ""
    signal_name: str = ""


@dataclass
class Engine:
    """Runs the runs this incarnation owns; its heartbeat keeps them all."""

    journal: Journal
    registry: ToolRegistry
    max_steps_in_flight: int = 256
    step_slot_reserve: int | None = None
    enabled: bool = True
    lease_seconds: float = 10.0
    # A run that only waits, and not for less than this, is parked (see RunTask._parking).
    park_after: float = 60.0
    # One replica on its own store (SQLite): it takes every unfinished run at start and runs
    # the runs it accepts itself. Several (PostgreSQL): runs are claimed, so they spread.
    single_replica: bool = True
    tracer: trace.Tracer = field(default_factory=lambda: trace.get_tracer("orchestrator.engine"))
    policy: TenantPolicy | None = None
    metrics: Metrics | None = None
    max_template_output_bytes: int = 1024 * 1024
    # Outputs and resolved parameters nest at most this deep (a stored Execution must stay
    # within protobuf's decoding limit of 100 message levels).
    max_value_depth: int = 24
    # CPU one expression evaluation may take; what cannot be priced within it runs in the
    # sandbox process (None: it fails too costly instead).
    expression_budget: float = DEFAULT_BUDGET_SECONDS
    sandbox: Sandbox | None = None
    runs: dict[str, RunTask] = field(default_factory=dict)
    # Runs of one plan (the common case) share its validation (read-only).
    validations: ValidationCache = field(default_factory=ValidationCache)

    async def wait_for_key(self, key: tuple[str, str], wake: asyncio.Event, at_most: float) -> None:
        """Until a run with `key` ends here, the tenant's runs change elsewhere, `wake` is
        set, or `at_most` seconds pass."""
        freed = self._key_freed.setdefault(key, asyncio.Event())
        waits = [asyncio.ensure_future(freed.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waits, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def key_freed(self, key: tuple[str, str]) -> None:
        """A run with `key` ended (or stopped waiting): the runs waiting on it ask again."""
        freed = self._key_freed.pop(key, None)
        if freed is not None:
            freed.set()

    def runs_waiting(self) -> dict[tuple[str, str], int]:
        """Runs here waiting on their concurrency key, by (tenant, key)."""
        counts: dict[tuple[str, str], int] = {}
        for task in self.runs.values():
            if task.blocked and task.key is not None:
                counts[task.key] = counts.get(task.key, 0) + 1
        return counts

    def tenant_changed(self, tenant_id: str | None) -> None:
        """A run of the tenant (None: of any, notices may have been missed) changed status on
        another replica: its keys may be free."""
        for key in [k for k in self._key_freed if tenant_id in (None, k[0])]:
            self.key_freed(key)

    def __post_init__(self) -> None:
        self.slots = FairSlots(
            self.max_steps_in_flight,
            reserve=self.step_slot_reserve,
            weight=self.policy.weight if self.policy is not None else None,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._claim_wake = asyncio.Event()
        self._lease_task: asyncio.Task[None] | None = None
        self.closing = False
        self.takeovers = 0
        self._key_freed: dict[tuple[str, str], asyncio.Event] = {}
        # Runs accepted here to run here (see `adopt`) whose first step has no slot yet.
        # Runs adopted and not settled: (tenant, when), oldest first; and their count by tenant.
        self._adopted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._adopted_by: dict[str, int] = {}
        # Tasks are numbered as they start: a heartbeat abandons only tasks older than itself
        # (a run taken by an answer while it was in flight is not in what it read).
        self._born = 0
        # When runs parked here are due: the claimer wakes then (other replicas poll).
        self._wakeups: set[asyncio.TimerHandle] = set()
        if self.enabled:
            self.journal.taker = self

    @property
    def accepting(self) -> bool:
        """Whether this engine takes runs now (the journal asks, for parked runs)."""
        return self.enabled and not self.closing

    @property
    def parks(self) -> bool:
        return self.journal.parks

    def take(self, run_id: str) -> None:
        """The run was taken here (committed): run it, once a task of it still winding down
        (one that parked it, or finished it before a retry) has ended."""
        task = self.runs.get(run_id)
        if task is None:
            self.submit(run_id)
        else:
            task.resubmit = True

    def parked(self, wake_at: float) -> None:
        """A run parked here is due at `wake_at`: claim then (or sooner, by any replica)."""
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._wakeups.discard(handle)
            self.wake_claimer()

        handle = loop.call_at(loop.time() + max(wake_at - time.time(), 0.0) + 0.01, due)
        self._wakeups.add(handle)

    @property
    def owner(self) -> str:
        return self.journal.owner

    def adopt(self, tenant_id: str, run_id: str) -> bool:
        """Whether a run the tenant submits here should run here at once rather than wait
        for a claim (several replicas): yes when a step slot is free to the tenant now,
        counting the runs adopted in the last ADOPTED_FOR seconds that have not taken theirs
        (Temporal's sync match). `settle` lets a run go early: its first step took a slot,
        its task ended, or it was not created."""
        if self.closing or not self.enabled:
            return False
        now = time.monotonic()
        # Kept in the order adopted: the lapsed ones are at the front.
        while self._adopted:
            oldest = next(iter(self._adopted))
            if now - self._adopted[oldest][1] <= ADOPTED_FOR:
                break
            self.settle(oldest)
        mine = self._adopted_by.get(tenant_id, 0)
        if not self.slots.free_to(tenant_id, mine, len(self._adopted)):
            return False
        self._adopted[run_id] = (tenant_id, now)
        self._adopted_by[tenant_id] = mine + 1
        return True

    def settle(self, run_id: str) -> None:
        adopted = self._adopted.pop(run_id, None)
        if adopted is not None:
            left = self._adopted_by[adopted[0]] - 1
            if left:
                self._adopted_by[adopted[0]] = left
            else:
                del self._adopted_by[adopted[0]]

    def submit(self, run_id: str, inserted: Inserted | None = None) -> None:
        """Start the run's task (the lease is held) unless it already has one; `inserted`,
        the rows of a run just created here, spares its task reading them back."""
        if self.closing or not self.enabled or run_id in self.runs:
            self.settle(run_id)
            return
        task = RunTask(self, run_id, inserted)
        self._born += 1
        task.born = self._born
        self.runs[run_id] = task
        handle = asyncio.create_task(task.main(), name=f"run-{run_id}")
        self._tasks.add(handle)
        handle.add_done_callback(self._tasks.discard)

    async def start(self) -> int:
        """Register this incarnation, take back the runs left unfinished (a restart), then
        keep beating and claiming."""
        if not self.enabled:
            return 0
        await self.journal.register(self.lease_seconds)
        recovered = await self.journal.claim(
            lapse=self.lease_seconds,
            limit=1_000_000,
            own=True,
            everything=self.single_replica,
        )
        for run_id in recovered:
            log.info("engine.recovering_run", run_id=run_id)
            self.submit(run_id)
        self._lease_task = asyncio.create_task(self._lease_loop(), name="engine-leases")
        return len(recovered)

    def resume_later(self, run_id: str, delay: float = 1.0) -> None:
        """Start the run's task again after `delay` (its last one stopped for the store)."""

        async def later() -> None:
            await asyncio.sleep(delay)
            self.submit(run_id)

        handle = asyncio.create_task(later(), name=f"resume-{run_id}")
        self._tasks.add(handle)
        handle.add_done_callback(self._tasks.discard)

    def wake_claimer(self) -> None:
        self._claim_wake.set()

    async def _lease_loop(self) -> None:
        # The heartbeat is one row written every third of the timeout; claims (reads, unless
        # they find something) look at least every CLAIM_POLL_SECONDS, so a timer parked by
        # a replica that died meanwhile is taken about when it is due.
        beat_every = max(self.lease_seconds / 3, 0.05)
        interval = min(beat_every, CLAIM_POLL_SECONDS)
        beaten = -beat_every
        loop = asyncio.get_running_loop()
        while not self.closing:
            try:
                async with asyncio.timeout(interval):
                    await self._claim_wake.wait()
            except TimeoutError:
                pass
            self._claim_wake.clear()
            if self.closing:
                return
            try:
                if loop.time() - beaten >= beat_every * 0.95:
                    beaten = loop.time()
                    await self._heartbeat()
                if await self._claim() == CLAIM_BATCH:
                    # More may be waiting: claim again soon, leaving other replicas a turn.
                    self._claim_wake.set()
                    await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                raise
            except STORE_OUTAGES:
                pass  # the store's health logs the outage once; the next turn tries again
            except Exception:
                log.exception("engine.lease_loop_failed")

    async def _heartbeat(self) -> None:
        before = self._born
        held = await self.journal.heartbeat()
        for run_id, task in list(self.runs.items()):
            if run_id not in held and task.loaded and task.born <= before and not task.gone:
                log.warning("engine.lease_lost", run_id=run_id)
                task.abandon()

    async def _claim(self) -> int:
        run_ids = await self.journal.claim(lapse=self.lease_seconds, limit=CLAIM_BATCH)
        for run_id in run_ids:
            if run_id in self.runs:
                # A task still winding down a finished run that was retried meanwhile.
                self.runs[run_id].resubmit = True
                continue
            self.takeovers += 1
            if self.metrics is not None:
                self.metrics.takeovers.inc()
            log.info("engine.claimed_run", run_id=run_id)
            self.submit(run_id)
        return len(run_ids)

    def control(self, run_id: str, status: RunStatus) -> None:
        """A control call changed the run's status (already committed)."""
        task = self.runs.get(run_id)
        if task is not None:
            task.on_status(status)

    def retried(self, run_id: str) -> None:
        """A finished run of ours went back to RUNNING (already committed): run it again, once
        the task that finished it, if it is still winding down, has ended."""
        self.take(run_id)

    def answered(self, run_id: str, clarification_id: str, answer: Answer) -> None:
        """A clarification was answered (already committed)."""
        task = self.runs.get(run_id)
        if task is not None:
            task.on_answer(clarification_id, answer)

    def signalled(self, run_id: str, signal_name: str | None) -> None:
        """A signal was kept for the run (already committed); None: some may have been
        missed (the cluster listener reconnected), so every waiting step looks again."""
        tasks = self.runs.values() if run_id == "" else [self.runs.get(run_id)]
        for task in list(tasks):
            if task is not None:
                task.on_signal(signal_name)

    async def stop(self, grace: float = 0.0) -> None:
        """Start no new step; let tool calls in flight finish within `grace` (steps waiting on
        a person or a back-off are left at once); cancel the rest; hand the leases back so
        another replica (or the next start) continues right away."""
        self.closing = True
        for wakeup in self._wakeups:
            wakeup.cancel()
        self._wakeups.clear()
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
        for task in list(self.runs.values()):
            task.on_closing()
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for handle in list(self._tasks):
            handle.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.enabled:
            try:
                released = await self.journal.release()
                log.info("engine.leases_released", runs=released)
            except Exception:
                log.exception("engine.release_failed")
        if self.sandbox is not None:
            await self.sandbox.close()


# A run whose plan or values are larger than these is prepared in a thread.
OFF_LOOP_PLAN_BYTES = 64 * 1024
OFF_LOOP_NODES = 10_000


class RunTask:
    """Schedules one run's steps until the run is finished."""

    def __init__(self, engine: Engine, run_id: str, inserted: Inserted | None = None) -> None:
        self.engine = engine
        self.journal = engine.journal
        self.run_id = run_id
        self.inserted = inserted  # for its first open only
        self.log = log.bind(run_id=run_id)
        self.wake = asyncio.Event()
        self.paused = False
        self.cancelled = False
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.starting: set[str] = set()  # steps whose start is being committed
        self.status: dict[str, StepStatus] = {}
        self.outputs: dict[str, JSON] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        # Steps written since their rows were read (started, asked about): the store's row
        # may differ from `rows`, so their next start reads it.
        self.touched: set[str] = set()
        self.failed_flows: list[str] = []
        self.failures: list[str] = []
        self.fatal: tuple[str, str] | None = None
        self.fatal_reason = "STEP_FAILED"
        self.answers: dict[str, asyncio.Future[Answer]] = {}
        # Steps waiting on a signal, by its name: each is woken to look in the store again.
        self.signal_waiters: dict[str, set[asyncio.Event]] = {}
        self.parked: set[str] = set()  # steps waiting on a signal right now
        self.approved: set[str] = set()
        self.loaded = False
        self.lost = False
        # The run was retried while this task wound it down: start a fresh task at the end.
        self.resubmit = False
        # A step task that ended with an error it did not handle (a bug): the run task
        # raises it rather than launching the step again.
        self.crashed: BaseException | None = None
        # (tenant, concurrency key) of a run that has one: its end lets the next one start.
        self.key: tuple[str, str] | None = None
        self.priority = DEFAULT_PRIORITY
        self.blocked = False  # PENDING, waiting on its concurrency key
        self.born = 0
        # In-flight steps ("" the run's approval) that only wait, and on what: when every
        # one does (or the run is paused with nothing in flight), the run is parked.
        self.idle: dict[str, Idle] = {}
        self.gone = False  # parked: the task ends without writing anything more
        # Instant steps made but not yet written, in order (`_attempt`): written in one unit,
        # with the run's end when they end it, before anything else is written or started.
        # Held only while one step task runs, so nothing else sees their outcomes.
        self.held: list[Link] = []
        self.held_vars: dict[str, JSON] | None = None  # the run's variables before them
        self.ended = False  # the held links' unit ended the run

    # ------------------------------------------------------------ notifications

    def on_status(self, status: RunStatus) -> None:
        if status is RunStatus.PAUSED:
            self.paused = True
        elif status is RunStatus.RUNNING:
            self.paused = False
        elif status is RunStatus.CANCELLED:
            self.cancelled = True
            for task in self.inflight.values():
                task.cancel()
        self.wake.set()

    def on_closing(self) -> None:
        """The replica is shutting down: only tool calls under way may finish. A step whose
        start is being committed counts as under way: its start commits whether or not we
        wait for it, and the replica taking over would run it again as a second attempt."""
        for step_id, task in self.inflight.items():
            running = self.status.get(step_id) is StepStatus.RUNNING
            if (not running or step_id in self.parked) and step_id not in self.starting:
                # A step parked on a signal is left at once, like one waiting on a person.
                task.cancel()
        self.wake.set()

    def abandon(self) -> None:
        """Another replica holds the run now: stop without writing anything."""
        self.lost = True
        for task in self.inflight.values():
            task.cancel()
        self.wake.set()

    def on_answer(self, clarification_id: str, answer: Answer) -> None:
        future = self.answers.get(clarification_id)
        if future is not None and not future.done():
            future.set_result(answer)
        self.wake.set()

    def on_signal(self, signal_name: str | None) -> None:
        for name, waiters in self.signal_waiters.items():
            if signal_name is None or name == signal_name:
                for waiter in waiters:
                    waiter.set()

    # ------------------------------------------------------------ main loop

    async def main(self) -> None:
        try:
            await self._main()
        except asyncio.CancelledError:
            for task in self.inflight.values():
                task.cancel()
            raise
        except LeaseLost:
            self.lost = True
            self.log.warning("engine.lease_lost")
            await self._cancel_inflight()
        except STORE_OUTAGES:
            # The journal waits outages out, so this is a read or a path that did not: the
            # run is not failed for it. Its task starts again from the store in a while.
            self.log.warning("engine.run_task_waiting_for_store")
            await self._cancel_inflight()
            self.engine.resume_later(self.run_id)
        except Exception:
            self.log.exception("engine.run_crashed")
            await self.journal.finish_run(
                self.run_id,
                Action.FAIL,
                error_message="internal error in the engine",
                error_reason="INTERNAL_ERROR",
            )
        finally:
            self.engine.runs.pop(self.run_id, None)
            self.journal.forget(self.run_id)
            self.engine.settle(self.run_id)
            if self.key is not None:
                self.engine.key_freed(self.key)
            self.log.info("engine.run_task_ended", cancelled=self.cancelled, lost=self.lost)
            if self.resubmit and not self.lost:
                self.engine.submit(self.run_id)

    def _prepare(
        self, row: Mapping[str, Any]
    ) -> tuple[ValidatedPlan, dict[str, JSON], dict[str, JSON], set[str]]:
        request = pb.ExecuteRequest(executable_plan=pb.ExecutablePlan.FromString(row["plan"]))
        plan = validate_request(request, self.engine.registry, cache=self.engine.validations)
        found: set[str] = set()
        params = secrets.unwrap(row["parameters"] or {}, found)
        variables = secrets.unwrap(row["variables"] or {}, found)
        return plan, params, variables, found

    async def _main(self) -> None:
        inserted, self.inserted = self.inserted, None
        row, step_rows, self.approved, refused = await self.journal.open(self.run_id, inserted)
        if row["concurrency_key"]:
            self.key = (row["tenant_id"], row["concurrency_key"])
        while row["status"] == RunStatus.PENDING.value:
            # Its key's runs are all taken: wait for one to end, here or on another replica
            # (heard by notice, and at the latest after KEY_RECHECK_SECONDS), then ask again.
            assert self.key is not None
            self.wake.clear()
            if self.cancelled or self.lost or self.engine.closing:
                return  # still PENDING in the store: whoever opens it next decides
            self.blocked = True
            try:
                await self.engine.wait_for_key(self.key, self.wake, KEY_RECHECK_SECONDS)
            finally:
                self.blocked = False
            row, step_rows, self.approved, refused = await self.journal.open(self.run_id)
        self.priority = row["priority"] or DEFAULT_PRIORITY
        self.tenant_id: str = row["tenant_id"]
        self.log = self.log.bind(tenant_id=self.tenant_id)
        # A large plan or large values take long Python work: off the event loop.
        large = len(row["plan"]) > OFF_LOOP_PLAN_BYTES or any(
            more_nodes_than(row[name], OFF_LOOP_NODES) for name in ("parameters", "variables")
        )
        if large:
            self.plan, self.params, self.vars, self.secrets = await asyncio.to_thread(
                self._prepare, row
            )
        else:
            self.plan, self.params, self.vars, self.secrets = self._prepare(row)
        self.trace_parent = parent_context(row["trace_parent"])
        context = self.plan.plan.security_context
        self.restricted = context.data_classification.lower() == "restricted"
        # The plan's own allowance, read once: repeated proto fields are scanned per lookup.
        self.allowed_tools = frozenset(context.allowed_tools)
        self.declared = frozenset(context.required_capabilities)
        for s in step_rows:
            self.rows[s["step_id"]] = s
            self.status[s["step_id"]] = StepStatus(s["status"])
            if s["status"] == StepStatus.COMPLETED.value:
                self.outputs[s["step_id"]] = s["output"]
        self.loaded = True
        status = RunStatus(row["status"])
        if status.terminal:
            return
        self.paused = status is RunStatus.PAUSED
        self.timeout: float = row["timeout_seconds"]
        self.deadline = (row["started_at"] or time.time()) + self.timeout
        # A step that failed before this task (its approval refused while the run was parked,
        # or a crash between the step's failure and the run's) fails its flow as it would have.
        for s in step_rows:
            if s["status"] == StepStatus.FAILED.value and s["step_id"] in self.plan.steps:
                info = self.plan.steps[s["step_id"]]
                self._failed(s["step_id"], info, s["error"], s["error_reason"])
        if refused:
            self.fatal = ("", "run approval rejected")
            self.fatal_reason = "APPROVAL_REJECTED"
        elif self.plan.plan.security_context.requires_approval and "" not in self.approved:
            self._launch("", self._approve_run())
        await self._schedule()

    async def _approve_run(self) -> None:
        answer = await self._ask("", "USER_VERIFICATION", "Approve running this plan?", [], "")
        if answer.run_failed:
            self.fatal = ("", "run approval rejected")
            self.fatal_reason = "APPROVAL_REJECTED"
        else:
            self.approved.add("")

    def _launch(self, step_id: str, work: Coroutine[Any, Any, None] | None = None) -> None:
        """Run a step (or the run's approval, as "") in its own task, tracked as in flight."""
        current = [step_id]  # the step the task runs now (it may go on to the next: _steps)
        task = asyncio.create_task(work or self._steps(current), name=f"step-{step_id}")
        self.inflight[step_id] = task

        def done(task: asyncio.Task[None]) -> None:
            self.inflight.pop(current[0], None)
            if not task.cancelled() and task.exception() is not None and self.crashed is None:
                self.crashed = task.exception()  # retrieved here, raised by the run task
            self.wake.set()

        task.add_done_callback(done)

    async def _schedule(self) -> None:
        timed_out = False
        while True:
            self.wake.clear()
            if self.cancelled or self.ended:
                return
            if self.lost:
                raise LeaseLost(self.run_id)
            if self.crashed is not None:
                raise self.crashed
            if self.engine.closing:
                if not self.inflight:
                    return  # the lease goes back; whoever takes the run goes on from here
                await self.wake.wait()
                continue
            if (
                self.fatal is None
                and not self.paused
                and not self.held
                and "" not in self.inflight
                and (not self.plan.plan.security_context.requires_approval or "" in self.approved)
            ):
                await self._skip_unreachable()
                for step_id in self._ready():
                    self._launch(step_id)
            if not self.inflight and (self.fatal is not None or not self._pending_normal()):
                break
            remaining = self.deadline - time.time()
            if remaining <= 0:
                timed_out = True
                break
            parking = self._parking()
            if parking is not None and await self.journal.park(self.run_id, parking):
                self._let_go(parking)
                return
            # A refused park (an event got there first) is tried again on the next wake.
            try:
                async with asyncio.timeout(remaining):
                    await self.wake.wait()
            except TimeoutError:
                pass
        if self.cancelled:
            return
        if not timed_out:
            # The run's timeout holds for compensation too: a rollback step waiting on a
            # person or a long tool is cut off like any other step.
            try:
                await asyncio.wait_for(self._rollback(), max(self.deadline - time.time(), 0))
            except TimeoutError:
                timed_out = True
            if self.cancelled:
                return
        if timed_out:
            await self._cancel_inflight()
            await self.journal.finish_run(
                self.run_id,
                Action.FAIL,
                error_message=f"run timed out after {self.timeout:g}s",
                error_reason="DEADLINE_EXCEEDED",
            )
            return
        if self.fatal is not None:
            step_id, error = self.fatal
            message = f"step {step_id} failed: {error}" if step_id else error
            message = secrets.redact(message, self.secrets)
            await self.journal.finish_run(
                self.run_id, Action.FAIL, error_message=message, error_reason=self.fatal_reason
            )
        else:
            message = ""
            if self.failures:
                message = "completed with failed steps: " + ", ".join(self.failures)
            await self.journal.finish_run(self.run_id, Action.COMPLETE, error_message=message)

    def _parking(self) -> Parking | None:
        """What the run waits for, when all it does is wait; else None."""
        if (
            not self.engine.parks
            or self.engine.closing
            or self.cancelled
            or self.lost
            or self.crashed is not None
            or self.fatal is not None
            or self.starting
            or self.idle.keys() != self.inflight.keys()
            or not (self.inflight or self.paused)
        ):
            return None
        wake_at = self.deadline
        clarifications: list[str] = []
        names: list[str] = []
        for idle in self.idle.values():
            if idle.clarification_id:
                future = self.answers.get(idle.clarification_id)
                if future is None or future.done():
                    return None  # answered: the step goes on
                clarifications.append(idle.clarification_id)
            elif idle.signal_name:
                names.append(idle.signal_name)
            elif idle.until is None and not self.paused:
                return None  # a pause wait of a run resumed meanwhile
            if idle.until is not None:
                wake_at = min(wake_at, idle.until)
        if any(w.is_set() for n in names for w in self.signal_waiters.get(n, ())):
            return None  # a signal came: the step looks for it
        if wake_at - time.time() < self.engine.park_after:
            # A short back-off or timer is held: letting go and claiming it back would cost
            # more writes than holding it, which costs none.
            return None
        return Parking(
            wake_at=wake_at,
            paused=self.paused,
            clarifications=tuple(clarifications),
            signal_names=tuple(sorted(set(names))),
        )

    def _let_go(self, parking: Parking) -> None:
        """The run is parked (committed): stop its waiting steps, write nothing more. A
        task that opens it again finds every wait in the store, as after a restart."""
        self.gone = True
        for task in self.inflight.values():
            task.cancel()
        self.engine.parked(parking.wake_at)
        self.log.info("engine.run_parked", wake_at=parking.wake_at, paused=parking.paused)

    @contextlib.contextmanager
    def _waiting(self, step_id: str, idle: Idle) -> Iterator[None]:
        """The step only waits meanwhile (the run task is told: it may park the run)."""
        self.idle[step_id] = idle
        self.wake.set()
        try:
            yield
        finally:
            self.idle.pop(step_id, None)

    async def _sleep(self, step_id: str, until: float) -> None:
        """A timer (a back-off, core.wait): the step waits until `until`, holding nothing."""
        await self._write_held()
        remaining = until - time.time()
        if remaining > 0:
            with self._waiting(step_id, Idle(until=until)):
                await asyncio.sleep(remaining)

    async def _cancel_inflight(self) -> None:
        tasks = list(self.inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _normal(self) -> list[str]:
        return [sid for sid in self.plan.steps if sid not in self.plan.rollback]

    def _pending_normal(self) -> bool:
        return any(self.status[sid] not in FINISHED for sid in self._normal())

    async def _skip_unreachable(self) -> None:
        """A step that needs a step which did not complete is SKIPPED, and so on down."""
        while True:
            skipped: list[Outcome] = []
            for sid in self._normal():
                if self.status[sid] is not StepStatus.PENDING or sid in self.inflight:
                    continue
                info = self.plan.steps[sid]
                blocker = next(
                    (
                        d
                        for d in info.depends_on
                        if self.status[d] in FINISHED and self.status[d] is not StepStatus.COMPLETED
                    ),
                    None,
                )
                if blocker is not None:
                    reason = f"needs {blocker}, which was {self.status[blocker].value.lower()}"
                    skipped.append(
                        Outcome(
                            sid, StepStatus.SKIPPED, error=reason, reason="DEPENDENCY_NOT_COMPLETED"
                        )
                    )
            if not skipped:
                return
            await self._record(skipped)

    def _ready(self) -> list[str]:
        ready: list[str] = []
        running: dict[str, int] = {}
        for sid in self.inflight:
            if sid:
                flow = self.plan.steps[sid].flow_id
                running[flow] = running.get(flow, 0) + 1
        for sid in self._normal():
            # RUNNING and WAITING steps found at start were in flight before a restart.
            if self.status[sid] not in (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.WAITING):
                continue
            if sid in self.inflight:
                continue
            info = self.plan.steps[sid]
            if any(self.status[d] is not StepStatus.COMPLETED for d in info.depends_on):
                continue
            if info.runs_after is not None and self.status[info.runs_after] not in FINISHED:
                continue
            policy = self.plan.flows[info.flow_id]
            limit = policy.max_concurrency if policy.parallel_execution else 1
            if limit and running.get(info.flow_id, 0) >= limit:
                continue
            running[info.flow_id] = running.get(info.flow_id, 0) + 1
            ready.append(sid)
        return ready

    # ------------------------------------------------------------ steps

    def _redacted(
        self, outcomes: list[Outcome], variables: Mapping[str, JSON] | None
    ) -> tuple[list[Outcome], Mapping[str, JSON] | None]:
        """Outcomes and variables as the store may keep them: without the run's secrets."""
        if not self.secrets:
            return outcomes, variables
        outcomes = [
            Outcome(
                o.step_id,
                o.status,
                secrets.redact(o.output, self.secrets),
                secrets.redact(o.error, self.secrets),
                o.reason,
            )
            for o in outcomes
        ]
        if variables:
            variables = secrets.redact(dict(variables), self.secrets)
        return outcomes, variables

    async def _record(
        self, outcomes: list[Outcome], variables: Mapping[str, JSON] | None = None
    ) -> None:
        outcomes, variables = self._redacted(outcomes, variables)
        await self._write_held()
        await self.journal.steps_finished(self.run_id, outcomes, variables=variables)
        self._apply(outcomes)

    def _apply(self, outcomes: list[Outcome]) -> None:
        """The task's copy follows outcomes the store has committed."""
        for outcome in outcomes:
            self.status[outcome.step_id] = outcome.status
            if outcome.status is StepStatus.COMPLETED:
                self.outputs[outcome.step_id] = outcome.output

    def _scope(self) -> Scope:
        return scope(self.params, self.vars, self.outputs, budget=self.engine.expression_budget)

    async def _steps(self, current: list[str]) -> None:
        """Run the step `current[0]`, then, while what it unblocked can start at once, the
        first of those in this same task (the others in tasks of their own): a sequential
        flow costs no task and no pass of the run's scheduling loop per step. Instant steps
        it makes one after another are held and written together (`_attempt`): before
        another task could see them, and with the run's end when the last of them ends it."""
        try:
            while True:
                step_id = current[0]
                await self._step(step_id)
                ready = self._next_ready(step_id)
                if self.held and (len(ready) != 1 or len(self.inflight) != 1):
                    await self._write_held(None if ready else self._ending_here())
                    ready = self._next_ready(step_id)  # as things are after the write
                if not ready:
                    return
                for other in ready[1:]:
                    self._launch(other)
                task = self.inflight.pop(step_id)
                self.inflight[ready[0]] = task
                current[0] = ready[0]
        except _Dropped:
            return
        except LeaseLost:
            self.lost = True
        finally:
            if self.held:  # cancelled: the run's task is ending, its held links with it
                self._unmake(self.held)

    def _next_ready(self, step_id: str) -> list[str]:
        """After `step_id` completed: the steps ready now, if the scheduling loop would start
        steps now; else none (the loop decides)."""
        if (
            self.status[step_id] is not StepStatus.COMPLETED
            or self.cancelled
            or self.lost
            or self.crashed is not None
            or self.engine.closing
            or self.fatal is not None
            or self.paused
            or "" in self.inflight
            or (self.plan.plan.security_context.requires_approval and "" not in self.approved)
        ):
            return []
        task = self.inflight.pop(step_id)
        try:
            return self._ready()  # counted without this step, which is done
        finally:
            self.inflight[step_id] = task

    def _may_hold(self, step_id: str, tool: Tool) -> bool:
        """Whether an instant step's attempt may be held (not written yet): the only task in
        flight runs it, its row is the one read (not written since), and nothing stops the
        run taking steps."""
        return (
            tool.instant
            and step_id not in self.touched
            and len(self.inflight) == 1
            and step_id in self.inflight
            and not (self.paused or self.cancelled or self.lost or self.engine.closing)
        )

    def _ending_here(self) -> Ending | None:
        """The run's end, when the step task's last step ends the run: nothing else in flight
        or pending, nothing failed (no compensation to run), time left."""
        if (
            len(self.inflight) != 1
            or self.fatal is not None
            or self.failed_flows
            or self.paused
            or self.cancelled
            or self.lost
            or self.engine.closing
            or self._pending_normal()
            or time.time() >= self.deadline
        ):
            return None
        return Ending(Action.COMPLETE)

    async def _write_held(self, ending: Ending | None = None) -> None:
        """Write the held links in one unit (with `ending`, the run's end too); raise
        _Dropped, the task's copy undone, when the store does not take them."""
        if not self.held:
            return
        links = self.held
        try:
            chained = await self.journal.chain(self.run_id, links, ending)
        except BaseException:
            self._unmake(links)
            raise
        if chained is None:
            self._unmake(links)
            raise _Dropped
        self.held, self.held_vars = [], None
        for link in links:
            self.touched.add(link.step_id)
            row = self.rows[link.step_id]
            row["attempts"] = link.attempt
            row["first_started_at"] = chained.first_started_at[link.step_id]
        self.ended = chained.ended

    def _unmake(self, links: list[Link]) -> None:
        """Held links the store will not have: the task's copy as the store has it, and
        their next attempt reads their rows."""
        for link in links:
            self.status[link.step_id] = StepStatus(link.known["status"])
            self.outputs.pop(link.step_id, None)
            self.touched.add(link.step_id)
        if self.held_vars is not None:
            self.vars = self.held_vars
        self.held, self.held_vars = [], None

    async def _step(self, step_id: str) -> None:
        info = self.plan.steps[step_id]
        try:
            await self._run_step(step_id, info)
        except StepFailed as failed:
            self._failed(step_id, info, str(failed), failed.reason)
        except LeaseLost:
            self.lost = True
        except (asyncio.CancelledError, _Dropped, *STORE_OUTAGES):
            raise  # an outage is never the step's failure: the run task deals with it
        except Exception as exc:  # a bug in a tool or in us: fail the step, not the process
            self.log.exception("engine.step_crashed", step_id=step_id)
            # The details (which may quote SQL or data) stay in the log, not in the run.
            error = f"internal error ({type(exc).__name__}); see the server log"
            await self._record(
                [Outcome(step_id, StepStatus.FAILED, error=error, reason="INTERNAL_ERROR")]
            )
            self._failed(step_id, info, error, "INTERNAL_ERROR")

    def _failed(self, step_id: str, info: StepInfo, error: str, reason: str) -> None:
        flow = self.plan.flows[info.flow_id]
        if info.flow_id not in self.failed_flows:
            self.failed_flows.append(info.flow_id)
        if flow.on_failure == "continue" or step_id in self.plan.rollback:
            self.failures.append(step_id)
            return
        if self.fatal is None:
            self.fatal = (step_id, error)
            self.fatal_reason = (
                "APPROVAL_REJECTED" if reason == "APPROVAL_REJECTED" else ("STEP_FAILED")
            )
            for sid, task in self.inflight.items():
                if sid != step_id:
                    task.cancel()

    async def _fail(self, step_id: str, error: str, reason: str) -> None:
        await self._record([Outcome(step_id, StepStatus.FAILED, error=error, reason=reason)])
        raise StepFailed(error, reason)

    async def _run_step(self, step_id: str, info: StepInfo) -> None:
        conditions_checked = self.status[step_id] is not StepStatus.PENDING
        if info.conditions and not conditions_checked:
            try:
                holds = True
                for condition in info.conditions:
                    if not await sandbox.check(self.engine.sandbox, condition, self._scope()):
                        holds = False
                        break
            except ExpressionError as exc:
                await self._fail(
                    step_id, f"condition could not be evaluated: {exc}", "CONDITION_ERROR"
                )
                return
            if not holds:
                await self._record(
                    [
                        Outcome(
                            step_id,
                            StepStatus.SKIPPED,
                            error="condition not met",
                            reason="CONDITION_FALSE",
                        )
                    ]
                )
                return
        tool = self.engine.registry.get(info.step.tool)
        if tool is None:
            await self._fail(step_id, f"unknown tool {info.step.tool!r}", "UNKNOWN_TOOL")
            return
        if info.step.requires_approval and step_id not in self.approved:
            answer = await self._ask(
                step_id, "USER_VERIFICATION", f"Approve step {step_id} ({info.step.tool})?", [], ""
            )
            if answer.step_status is StepStatus.FAILED:
                self.status[step_id] = StepStatus.FAILED
                raise StepFailed(answer.error, "APPROVAL_REJECTED")
            self.approved.add(step_id)
            self.status[step_id] = StepStatus.PENDING
        if tool.asks_person:
            await self._clarify(step_id, info)
            return
        await self._call(step_id, info, tool)

    async def _clarify(self, step_id: str, info: StepInfo) -> None:
        try:
            params = await sandbox.render(self.engine.sandbox, info.parameters, self._scope())
        except ExpressionError as exc:
            await self._fail(step_id, f"parameters could not be resolved: {exc}", "TEMPLATE_ERROR")
            return
        params = params if isinstance(params, dict) else {}
        category = CATEGORIES.get(str(params.get("category", "input")).lower(), "CUSTOM")
        raw_options = params.get("options") or []
        if not isinstance(raw_options, list):
            await self._fail(step_id, "options must be a list", "INVALID_PARAMETERS")
            return
        options = [str(o) for o in raw_options]
        answer = await self._ask(
            step_id,
            category,
            str(params.get("prompt", "")),
            options,
            str(params.get("argument_name", "")),
        )
        if answer.step_status is StepStatus.FAILED:
            self.status[step_id] = StepStatus.FAILED
            raise StepFailed(answer.error, "APPROVAL_REJECTED")
        self.status[step_id] = StepStatus.COMPLETED
        self.outputs[step_id] = answer.output

    async def _ask(
        self, step_id: str, category: str, prompt: str, options: list[str], argument_name: str
    ) -> Answer:
        await self._write_held()
        self.touched.add(step_id)
        clarification_id = await self.journal.request_clarification(
            self.run_id,
            step_id,
            category=category,
            prompt=prompt,
            options=options,
            argument_name=argument_name,
        )
        if clarification_id is None:
            raise asyncio.CancelledError
        if step_id:
            self.status[step_id] = StepStatus.WAITING
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.answers[clarification_id] = future
        try:
            with self._waiting(step_id, Idle(clarification_id=clarification_id)):
                return await future
        finally:
            self.answers.pop(clarification_id, None)

    async def _wait_resumed(self, step_id: str) -> None:
        if not self.paused or self.cancelled:
            return
        await self._write_held()
        with self._waiting(step_id, Idle()):
            while self.paused and not self.cancelled:
                self.wake.clear()
                await self.wake.wait()

    async def _call(self, step_id: str, info: StepInfo, tool: Tool) -> None:
        retry = Retry.of(
            info.step.retry_policy if info.step.HasField("retry_policy") else None,
            self.plan.default_retry_policy,
        )
        timeout = info.step.timeout.ToNanoseconds() / 1e9 if info.step.HasField("timeout") else None
        row = self.rows[step_id]
        wake_at = row.get("wake_at")
        carried: float | None = None
        if tool.waits_for_signal and row.get("status") == StepStatus.RUNNING.value:
            # A signal wait under way before a restart keeps its deadline (not a back-off).
            carried, wake_at = wake_at, None
        if wake_at:
            # A back-off that was under way before a restart keeps its deadline.
            await self._sleep(step_id, wake_at)
        while True:
            await self._wait_resumed(step_id)
            try:
                params = await sandbox.render(self.engine.sandbox, info.parameters, self._scope())
            except ExpressionError as exc:
                await self._fail(
                    step_id, f"parameters could not be resolved: {exc}", "TEMPLATE_ERROR"
                )
                return
            params = secrets.unwrap(params, self.secrets)
            if self.restricted:
                secrets.collect_strings(params, self.secrets)
            if json_depth(params, self.engine.max_value_depth) > self.engine.max_value_depth:
                await self._fail(
                    step_id,
                    f"resolved parameters nest deeper than {self.engine.max_value_depth} levels",
                    "TEMPLATE_TOO_DEEP",
                )
                return
            size = len(json.dumps(params, separators=(",", ":")))
            if size > self.engine.max_template_output_bytes:
                await self._fail(
                    step_id,
                    f"resolved parameters are {size:,} bytes; the limit is "
                    f"{self.engine.max_template_output_bytes:,}",
                    "TEMPLATE_TOO_LARGE",
                )
                return
            if self.engine.closing and step_id not in self.plan.rollback:
                return  # draining: no new attempt; whoever takes the run over starts it
            # A step takes its slot, then starts: one waiting for a slot still shows PENDING.
            # A parked signal wait holds no slot: it costs nothing until a signal.
            slot = (
                contextlib.nullcontext()
                if tool.waits_for_signal
                else self.engine.slots.take(self.tenant_id, self.priority)
            )
            async with slot:
                self.engine.settle(self.run_id)  # adopted at accept: its first slot is taken
                attempt = await self._attempt(step_id, tool, params, timeout, carried, retry)
            carried = None
            if attempt is None:
                # Paused (or cancelled) before the start committed: wait and retry.
                if self.cancelled:
                    return
                with self._waiting(step_id, Idle()):
                    self.wake.clear()
                    await self.wake.wait()
                continue
            if attempt.again:
                continue
            if attempt.outcome is None:
                delay = retry.delay(attempt.started.budget_attempt)
                await self.journal.step_retrying(
                    self.run_id,
                    step_id,
                    secrets.redact(attempt.retry_error, self.secrets),
                    time.time() + delay,
                )
                self.status[step_id] = StepStatus.PENDING
                await self._sleep(step_id, time.time() + delay)
                continue
            if attempt.variables:
                self.vars = {**self.vars, **attempt.variables}
            if attempt.recorded:
                self._apply([attempt.outcome])
            else:
                await self._record([attempt.outcome], attempt.variables)
            if attempt.outcome.status is StepStatus.FAILED:
                raise StepFailed(attempt.outcome.error, attempt.outcome.reason)
            return

    async def _attempt(
        self,
        step_id: str,
        tool: Tool,
        params: JSON,
        limit: float | None,
        carried: float | None,
        retry: Retry,
    ) -> Attempt | None:
        """One attempt: its start, the call, how it ended; None when the run took no new step
        (paused or cancelled before the start committed). An instant tool is called first, and
        its start goes with its outcome: one write for the whole attempt, or none yet when the
        attempt is held (`_held_attempt`)."""
        row = self.rows[step_id]
        if self._may_hold(step_id, tool):
            return await self._held_attempt(step_id, tool, params, limit, carried, retry)
        await self._write_held()
        known = None if step_id in self.touched else row
        # An instant tool's start is queued once its outcome can go with it: one write, even
        # when the writer is idle and would have taken the start alone at once.
        start = self.journal.start_step(
            self.run_id, step_id, row["attempts"] + 1, known, deferred=tool.instant
        )
        # Under way from here: on drain, the start commits whether or not we wait for it, and
        # the replica taking over would run the step again as a second attempt.
        self.starting.add(step_id)
        try:
            if not tool.instant:
                started = await self._committed(step_id, start)
                if started is None:
                    return None
                self.starting.discard(step_id)  # started: a step under way like any other
                return await self._invoke(step_id, tool, params, limit, carried, retry, started)
            expected = _next_attempt(row, start.at)
            attempt = await self._invoke(step_id, tool, params, limit, carried, retry, expected)
            rides = False
            if attempt.outcome is not None:
                outcomes, variables = self._redacted([attempt.outcome], attempt.variables)
                rides = start.finish(outcomes[0], variables)
            start.submit()
            committed = await self._committed(step_id, start)
            if committed is None:
                return None  # the outcome is dropped: the attempt never started
            if rides and not committed.finished:
                # The store counted another attempt than the call was made as: call again.
                self.log.warning("engine.attempt_mismatch", step_id=step_id)
                return Attempt(committed, again=True)
            attempt.started = committed
            if rides:
                attempt.outcome, attempt.recorded = outcomes[0], True
            return attempt
        finally:
            self.starting.discard(step_id)

    async def _held_attempt(
        self,
        step_id: str,
        tool: Tool,
        params: JSON,
        limit: float | None,
        carried: float | None,
        retry: Retry,
    ) -> Attempt:
        """An instant step's attempt, made before anything of it is written: a completed one
        is held (`_may_hold`), to be written with the instant steps made after it; anything
        else (a failure, a retry to come, a run that stopped taking steps meanwhile) is
        written at once with the links held before it. Raises _Dropped when the store no
        longer takes them."""
        row = self.rows[step_id]
        at = time.time()
        expected = _next_attempt(row, at)
        attempt = await self._invoke(step_id, tool, params, limit, carried, retry, expected)
        outcomes, variables = self._redacted(
            [attempt.outcome] if attempt.outcome is not None else [], attempt.variables
        )
        outcome = outcomes[0] if outcomes else None
        if not self.held:
            self.held_vars = self.vars
        link = Link(step_id, dict(row), expected.attempt, at, outcome, time.time(), variables)
        self.held.append(link)
        completed = outcome is not None and outcome.status is StepStatus.COMPLETED
        if completed and self._may_hold(step_id, tool):
            attempt.recorded = True
            return attempt
        await self._write_held()
        attempt.started = Started(
            expected.attempt,
            row["first_started_at"],
            expected.attempts_before,
            finished=outcome is not None,
        )
        if outcome is None:
            self.status[step_id] = StepStatus.RUNNING  # a retry follows
        else:
            attempt.outcome, attempt.recorded = outcome, True
        return attempt

    async def _committed(self, step_id: str, start: StepStart) -> Started | None:
        """The step's start once committed; the task's copy of the step follows it."""
        started = await start.committed()
        if started is not None:
            self.touched.add(step_id)
            self.status[step_id] = StepStatus.RUNNING
            row = self.rows[step_id]
            row["attempts"] = started.attempt
            row["first_started_at"] = started.first_started_at
        return started

    async def _invoke(
        self,
        step_id: str,
        tool: Tool,
        params: JSON,
        limit: float | None,
        carried: float | None,
        retry: Retry,
        started: Started,
    ) -> Attempt:
        """Call the tool as attempt `started` and say how the attempt ended."""
        problem = self._capability_problem(tool)
        if problem:
            return Attempt(
                started,
                Outcome(step_id, StepStatus.FAILED, error=problem, reason="CAPABILITY_DENIED"),
            )
        ctx = ToolContext(
            run_id=self.run_id,
            step_id=step_id,
            attempt=started.attempt,
            tenant_id=self.tenant_id,
            idempotency_key=f"{self.run_id}/{step_id}",
            logger=self.log.bind(step_id=step_id, attempt=started.attempt),
            first_started_at=started.first_started_at,
        )
        span = self.engine.tracer.start_span(
            f"step {step_id}",
            context=self.trace_parent,
            attributes={
                "orchestrator.run_id": self.run_id,
                "orchestrator.step_id": step_id,
                "orchestrator.tool": tool.name,
                "orchestrator.attempt": started.attempt,
                "orchestrator.tenant_id": self.tenant_id,
            },
        )
        began = time.monotonic()
        arguments = params if isinstance(params, dict) else {}
        try:
            with trace.use_span(span, end_on_exit=True, record_exception=False):
                if tool.waits_for_signal:
                    checked = await tool.call(ctx, arguments)
                    waiting = self._await_signal(step_id, checked, carried)
                    taken = await (asyncio.wait_for(waiting, limit) if limit else waiting)
                    output = taken.payload
                else:
                    call = self._call_tool(step_id, tool, ctx, arguments)
                    output = await (asyncio.wait_for(call, limit) if limit else call)
        except (ToolError, TimeoutError, OrchestratorError) as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc) or type(exc).__name__)
            error, retryable, reason = self._attempt_error(exc, tool, limit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A tool that raises anything else met input it could not take (a wrong type,
            # a malformed URL...): the step fails, precisely, rather than the engine.
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
            self.log.warning("engine.tool_raised", step_id=step_id, error=type(exc).__name__)
            error = f"{tool.name} could not use its parameters: {type(exc).__name__}: {exc}"
            error, retryable, reason = error[:500], False, "TOOL_ERROR"
        else:
            error = ""
        finally:
            if self.engine.metrics is not None:
                self.engine.metrics.step_duration.labels(tool.name).observe(
                    time.monotonic() - began
                )
        if not error and tool.waits_for_signal:
            # take_signal committed the step with the payload as its output.
            return Attempt(started, Outcome(step_id, StepStatus.COMPLETED, output), recorded=True)
        if not error and (
            json_depth(output, self.engine.max_value_depth) > self.engine.max_value_depth
            or not finite(output)
        ):
            error = (
                f"the output nests deeper than {self.engine.max_value_depth} levels or "
                "holds a number JSON cannot carry"
            )
            return Attempt(
                started, Outcome(step_id, StepStatus.FAILED, error=error, reason="OUTPUT_INVALID")
            )
        if not error:
            variables = output if tool.sets_variables and isinstance(output, dict) else None
            return Attempt(started, Outcome(step_id, StepStatus.COMPLETED, output), variables)
        if retryable and started.budget_attempt < retry.max_attempts:
            return Attempt(started, retry_error=error)
        tried = started.budget_attempt
        attempts = f" after {tried} attempts" if tried > 1 else ""
        if retryable and retry.max_attempts > 1:
            reason = "RETRIES_EXHAUSTED"
        return Attempt(
            started, Outcome(step_id, StepStatus.FAILED, error=f"{error}{attempts}", reason=reason)
        )

    async def _call_tool(
        self, step_id: str, tool: Tool, ctx: ToolContext, params: dict[str, JSON]
    ) -> JSON:
        """Call the tool (in the step's slot). A timer (core.wait) waits first as a wait the
        run may be parked on (which gives the slot back); the tool then finds its deadline
        passed."""
        if tool.sleeps_until is not None:
            await self._sleep(step_id, tool.sleeps_until(ctx, params))
        return await tool.call(ctx, params)

    async def _await_signal(
        self, step_id: str, checked: dict[str, JSON], carried: float | None
    ) -> Taken:
        """Take the next signal named in `checked` (kept in the store, oldest first), waiting
        until one is sent or the wait's deadline passes (SIGNAL_TIMEOUT, retryable)."""
        name: str = checked["signal_name"]
        limit: float | None = checked["timeout_seconds"]
        deadline = carried
        if deadline is None and limit is not None:
            deadline = time.time() + limit
        waiter = asyncio.Event()
        self.signal_waiters.setdefault(name, set()).add(waiter)
        try:
            while True:
                waiter.clear()
                taken = await self.journal.take_signal(self.run_id, step_id, name, deadline)
                if taken is not None:
                    return taken
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    raise ToolError(
                        f"no signal {name!r} within {limit or 0:g}s", reason="SIGNAL_TIMEOUT"
                    )
                self.parked.add(step_id)
                try:
                    with self._waiting(step_id, Idle(until=deadline, signal_name=name)):
                        async with asyncio.timeout(remaining):
                            await waiter.wait()
                except TimeoutError:
                    pass
                finally:
                    self.parked.discard(step_id)
        finally:
            waiters = self.signal_waiters.get(name, set())
            waiters.discard(waiter)
            if not waiters:
                self.signal_waiters.pop(name, None)

    @staticmethod
    def _attempt_error(
        exc: ToolError | TimeoutError | OrchestratorError, tool: Tool, timeout: float | None
    ) -> tuple[str, bool, str]:
        """(error, retryable, reason) of a failed attempt."""
        if isinstance(exc, ToolError):
            return str(exc), exc.retryable and tool.retryable, exc.reason
        if isinstance(exc, TimeoutError):
            return f"timed out after {timeout or 0:g}s", tool.retryable, "TIMEOUT"
        return exc.message, False, exc.reason

    def _capability_problem(self, tool: Tool) -> str:
        """The engine checks again before each call (the plan was checked at submit)."""
        # A plan that declares nothing was submitted with validate_capabilities=false.
        if self.allowed_tools or self.declared:
            if self.allowed_tools and tool.name not in self.allowed_tools:
                return f"tool {tool.name!r} is not in the plan's allowed_tools"
            missing = sorted(tool.capabilities - self.declared)
            if missing:
                return f"capabilities not declared: {', '.join(missing)}"
        # The tenant policy holds whatever the caller asked to skip.
        if self.engine.policy is not None:
            # The tenant's grants may have shrunk since submit (the policy file is re-read).
            denied = sorted(tool.capabilities - self.engine.policy.granted(self.tenant_id))
            if denied:
                return f"capabilities not granted to the tenant: {', '.join(denied)}"
        return ""

    async def _rollback(self) -> None:
        """Compensation: each failed flow's rollback steps, in order."""
        for flow_id in self.failed_flows:
            for sid in self.plan.flows[flow_id].rollback_steps:
                if self.status.get(sid) is not StepStatus.PENDING or self.cancelled:
                    continue
                try:
                    # The whole step path: conditions, approval, core.clarify, retries.
                    await self._run_step(sid, self.plan.steps[sid])
                except StepFailed:
                    self.failures.append(sid)

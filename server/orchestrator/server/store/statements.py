"""The store's prebuilt statements (hot paths) and the helpers that bind them.

Building a Core statement costs more than running it (about 100 us against 30), and every
step transition runs five of them: they are built once, here, and marked for the SQLite
driver path (store/direct.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from orchestrator.server.lifecycle import RunStatus, StepStatus
from orchestrator.server.store.direct import MISSED, direct
from orchestrator.server.store.schema import clarifications, events, runs, steps

EVENT_ORDER_LOCK = 0x6F726368  # an arbitrary advisory-lock key ("orch")
LOCK_EVENT_ORDER = sa.text(f"SELECT pg_advisory_xact_lock({EVENT_ORDER_LOCK})")


def one_of(column: sa.Column[Any], choices: Iterable[str]) -> sa.ColumnElement[bool]:
    """`column IN (...)` over our own constants, written into the SQL: a list would be an
    expanding parameter, rendered again on every execution."""
    return column.in_([sa.literal_column(f"'{c}'") for c in choices])


UNFINISHED = (RunStatus.PENDING.value, RunStatus.RUNNING.value, RunStatus.PAUSED.value)
COUNT_UNFINISHED = direct(
    sa.select(sa.func.count())
    .select_from(runs)
    .where(runs.c.tenant_id == sa.bindparam("w_tenant_id"), one_of(runs.c.status, UNFINISHED))
)
# A run's plan and parameters can be megabytes and only its task's start needs them: every
# other read of a run (each transition's among them) leaves them out; copying and decoding
# them holds the interpreter for as long.
RUN_INPUTS = ("plan", "parameters")
RUN_COLUMNS = tuple(column for column in runs.c if column.name not in RUN_INPUTS)
SELECT_RUN = direct(sa.select(*RUN_COLUMNS).where(runs.c.run_id == sa.bindparam("w_run_id")))
SELECT_RUN_INPUTS = direct(
    sa.select(runs.c.plan, runs.c.parameters).where(runs.c.run_id == sa.bindparam("w_run_id"))
)
SELECT_RUN_LOCKED = direct(SELECT_RUN.with_for_update())
SELECT_TENANT_RUN = direct(SELECT_RUN.where(runs.c.tenant_id == sa.bindparam("w_tenant_id")))
SELECT_TENANT_RUN_LOCKED = direct(SELECT_TENANT_RUN.with_for_update())
SELECT_STEPS = direct(
    sa.select(steps).where(steps.c.run_id == sa.bindparam("w_run_id")).order_by(steps.c.position)
)
SELECT_STEP = direct(
    sa.select(steps).where(
        steps.c.run_id == sa.bindparam("w_run_id"), steps.c.step_id == sa.bindparam("w_step_id")
    )
)
SELECT_PENDING_CLARIFICATIONS = direct(
    sa.select(clarifications)
    .where(
        clarifications.c.run_id == sa.bindparam("w_run_id"), clarifications.c.status == "PENDING"
    )
    .order_by(clarifications.c.created_at)
)
OPEN_STEPS = (StepStatus.PENDING.value, StepStatus.RUNNING.value, StepStatus.WAITING.value)
# A finishing run's steps still open (skipped or cancelled with it), and its questions
# nobody will answer now (withdrawn): once per run, prebuilt like the transitions'.
SELECT_OPEN_STEPS = direct(
    sa.select(steps)
    .where(
        steps.c.run_id == sa.bindparam("w_run_id"),
        one_of(steps.c.status, OPEN_STEPS),
    )
    .order_by(steps.c.position)
)
WITHDRAW_CLARIFICATIONS = direct(
    sa.update(clarifications)
    .where(
        clarifications.c.run_id == sa.bindparam("w_run_id"), clarifications.c.status == "PENDING"
    )
    .values(
        status="WITHDRAWN",
        resolved_at=sa.bindparam("v_resolved_at", type_=clarifications.c.resolved_at.type),
    )
)
SELECT_APPROVALS = direct(
    sa.select(
        clarifications.c.step_id, clarifications.c.response, clarifications.c.resolved_at
    ).where(
        clarifications.c.run_id == sa.bindparam("w_run_id"),
        clarifications.c.status == "RESOLVED",
        clarifications.c.category == "USER_VERIFICATION",
    )
)
SELECT_RUN_STATUS = direct(
    sa.select(runs.c.status, runs.c.last_sequence).where(
        runs.c.run_id == sa.bindparam("w_run_id"), runs.c.tenant_id == sa.bindparam("w_tenant_id")
    )
)
SELECT_EVENTS = direct(
    sa.select(events.c.sequence, events.c.status_changed, events.c.status, events.c.payload)
    .where(events.c.run_id == sa.bindparam("w_run_id"), events.c.sequence > sa.bindparam("w_after"))
    .order_by(events.c.sequence)
    .limit(sa.bindparam("w_limit"))
)
# A step's question and its answer (each core.clarify step and approval asks and is
# answered once): prebuilt like the transitions'.
SELECT_STEP_CLARIFICATION = direct(
    sa.select(clarifications.c.clarification_id).where(
        clarifications.c.run_id == sa.bindparam("w_run_id"),
        clarifications.c.step_id == sa.bindparam("w_step_id"),
        clarifications.c.status == "PENDING",
    )
)
SELECT_CLARIFICATION = direct(
    sa.select(clarifications).where(
        clarifications.c.clarification_id == sa.bindparam("w_clarification_id"),
        clarifications.c.run_id == sa.bindparam("w_run_id"),
    )
)
INSERT_CLARIFICATION = direct(sa.insert(clarifications))
INSERT_RUN = direct(sa.insert(runs))
INSERT_STEPS = direct(sa.insert(steps))
INSERT_EVENTS = direct(sa.insert(events))


def _update(table: sa.Table, where: tuple[str, ...], keys: tuple[str, ...]) -> sa.Update:
    """UPDATE `table` SET `keys` WHERE `where` (parameters v_<key> and w_<column>)."""
    return direct(
        sa.update(table)
        .where(*(table.c[w] == sa.bindparam(f"w_{w}") for w in where))
        .values({k: sa.bindparam(f"v_{k}", type_=table.c[k].type) for k in keys})
    )


RESOLVE_CLARIFICATION = _update(
    clarifications,
    ("clarification_id",),
    ("status", "response", "responded_by", "resolved_at"),
)


@functools.cache
def update_step_statement(keys: tuple[str, ...]) -> sa.Update:
    """UPDATE one step's `keys` (parameters w_run_id, w_step_id and v_<key>)."""
    return _update(steps, ("run_id", "step_id"), keys)


@functools.cache
def update_run_statement(keys: tuple[str, ...], owned: bool = False) -> sa.Update:
    """Compare-and-set a run's `keys` (parameters w_run_id, w_version and v_<key>); `owned`
    also compares its owner (w_owner): claims and parks change it without a new version."""
    return _update(runs, ("run_id", "version", "owner") if owned else ("run_id", "version"), keys)


@functools.cache
def update_run_and_step_statement(
    keys: tuple[str, ...], owned: bool, step_keys: tuple[str, ...]
) -> sa.Update:
    """`update_run_statement` and, only when its compare-and-set matched, one step's
    `step_keys` (parameters w_step_id and s_<key>), in one statement (PostgreSQL: a
    data-modifying CTE). The run's row is locked first, as everywhere."""
    run = update_run_statement(keys, owned).returning(runs.c.run_id).cte("run_set")
    return direct(
        sa.update(steps)
        .where(
            steps.c.run_id == sa.bindparam("w_run_id"),
            steps.c.step_id == sa.bindparam("w_step_id"),
            sa.exists(sa.select(run.c.run_id)),
        )
        .values({k: sa.bindparam(f"s_{k}", type_=steps.c[k].type) for k in step_keys})
    )


@functools.cache
def checked(statement: sa.Update) -> sa.Select[Any]:
    """A compare-and-set that fails, at run time, when it changes no row: its error says
    MISSED (a cast of that text to an integer). Deferred writes (SyncConnection.write) have
    no row count to look at; an executemany of these fails as a whole when one misses."""
    changed = statement.returning(sa.literal_column("1")).cte("changed")
    count = sa.func.count()
    return direct(
        sa.select(
            sa.case(
                (count == sa.literal_column("1"), sa.literal_column("1")),
                else_=sa.cast(
                    sa.literal_column(f"'{MISSED}: '") + sa.cast(count, sa.String), sa.Integer
                ),
            )
        ).select_from(changed)
    )


def bind(changes: Mapping[str, Any], **where: Any) -> dict[str, Any]:
    """Parameters for the statements above."""
    params = {f"v_{k}": v for k, v in changes.items()}
    params.update({f"w_{k}": v for k, v in where.items()})
    return params


# Store strings -> proto enums, built once.

"""The plan store: every plan a tenant executes, kept once by its hash (written with each run
by `RunStore`; read here)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from orchestrator.server.errors import NotFound
from orchestrator.server.store.database import Database
from orchestrator.server.store.records import Row
from orchestrator.server.store.schema import plans
from orchestrator.server.store.snapshots import timestamp
from orchestrator.v1 import orchestrator_pb2 as pb


def plan_not_found(plan_hash: str) -> NotFound:
    """The one NotFound for plans, identical for unknown hashes and other tenants' plans."""
    return NotFound(
        f"plan {plan_hash[:100]!r} not found",
        reason="PLAN_NOT_FOUND",
        metadata={"plan_hash": plan_hash[:100]},
    )


class PlanStore:
    """Reads of the tenant's stored plans."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def plan(self, tenant_id: str, plan_hash: str) -> pb.ExecutablePlan:
        """The stored plan of this hash; PLAN_NOT_FOUND when the tenant has none."""
        return (await self.get(tenant_id, plan_hash)).executable_plan

    async def get(self, tenant_id: str, plan_hash: str) -> pb.StoredPlan:
        """The stored plan with what is known of it; PLAN_NOT_FOUND as for `plan`."""
        query = sa.select(plans).where(
            plans.c.tenant_id == tenant_id, plans.c.plan_hash == plan_hash
        )

        async def read(conn: Any) -> Row | None:
            row: Row | None = (await conn.execute(query)).mappings().first()
            return row

        row = await self.db.read(read)
        if row is None:
            raise plan_not_found(plan_hash)
        stored = stored_plan(row)
        stored.executable_plan.ParseFromString(row["plan"])
        return stored

    async def page(
        self, tenant_id: str, *, limit: int, before_pk: int | None
    ) -> tuple[list[pb.StoredPlan], int | None]:
        """Up to `limit` plans, most recently stored first, and the key to continue after."""
        columns = [c for c in plans.c if c.name != "plan"]
        query = sa.select(*columns).where(plans.c.tenant_id == tenant_id)
        if before_pk is not None:
            query = query.where(plans.c.pk < before_pk)
        query = query.order_by(plans.c.pk.desc()).limit(limit + 1)

        async def read(conn: Any) -> list[Row]:
            return list((await conn.execute(query)).mappings().all())

        rows = await self.db.read(read)
        more = len(rows) > limit
        rows = rows[:limit]
        return [stored_plan(r) for r in rows], (rows[-1]["pk"] if more and rows else None)


def stored_plan(row: Row) -> pb.StoredPlan:
    """A plans row as a StoredPlan, without its body."""
    stored = pb.StoredPlan(
        plan_hash=row["plan_hash"],
        plan_id=row["plan_id"],
        name=row["plan_name"],
        version=row["plan_version"],
    )
    stored.created_at.CopyFrom(timestamp(row["created_at"]))
    if row["last_run_at"] is not None:
        stored.last_run_at.CopyFrom(timestamp(row["last_run_at"]))
    return stored

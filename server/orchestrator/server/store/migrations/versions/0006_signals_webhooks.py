"""signals: what was sent to a run and which step took it

Revision ID: 0006_signals_webhooks
Revises: 0004_run_labels
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_signals_webhooks"
down_revision = "0004_run_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signals",
        sa.Column(
            "pk",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("signal_name", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.String(length=256), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("consumed_by", sa.String(length=128), server_default="", nullable=False),
        sa.Column("consumed_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("run_id", "request_id", name="uq_signals_run_request"),
    )
    op.create_index(
        "ix_signals_waiting", "signals", ["run_id", "signal_name", "consumed_by"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_signals_waiting", table_name="signals")
    op.drop_table("signals")

"""steps.attempts_before: attempts made before the last retry of the run (a fresh budget)

Revision ID: 0005_step_attempts_before
Revises: 0004_run_labels
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_step_attempts_before"
down_revision = "0004_run_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "steps", sa.Column("attempts_before", sa.Integer(), server_default="0", nullable=False)
    )


def downgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.drop_column("attempts_before")

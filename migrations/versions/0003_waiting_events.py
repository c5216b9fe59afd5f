"""waiting events (game events decided to wait for what they depend on), dead events
(the rules' dead-letter decisions, kept so a redelivery decides the same), and the
players an applied event touched beyond those it names (for a duplicate's cache refresh)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("processed_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("touched", sa.Text(), nullable=True))
    op.create_table(
        "dead_events",
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("entry_id", sa.String(length=41), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("stream", "entry_id", name=op.f("pk_dead_events")),
    )
    op.create_table(
        "waiting_events",
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("entry_id", sa.String(length=41), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("waits_for", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("stream", "entry_id", name=op.f("pk_waiting_events")),
    )


def downgrade() -> None:
    op.drop_table("waiting_events")
    op.drop_table("dead_events")
    with op.batch_alter_table("processed_events", schema=None) as batch_op:
        batch_op.drop_column("touched")

"""game_sessions.roster_order: the live roster's user ids in the last update's order

`session_players` holds who plays (one row a player, for the one-live-session rule),
not in which order the update named them. A session read back from the database (a
duplicate's cache refresh, another worker, `replay --refresh-caches`) listed its
players by user id in the session hash; this keeps the update's order. NULL for
sessions written before: they read back by user id, as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("game_sessions", sa.Column("roster_order", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("game_sessions", schema=None) as batch_op:
        batch_op.drop_column("roster_order")

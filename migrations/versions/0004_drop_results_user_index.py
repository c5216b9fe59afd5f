"""drop game_results' index on user_id: nothing reads results by player, and every
result row inserted one random entry into it (a page dirtied per result at commit)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("game_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_game_results_user_id"))


def downgrade() -> None:
    with op.batch_alter_table("game_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_game_results_user_id"), ["user_id"], unique=False)

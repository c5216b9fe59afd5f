"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "game_sessions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("meta", sa.Text(), nullable=False),
        sa.Column("end_reason", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_game_sessions")),
        sa.UniqueConstraint("session_id", name=op.f("uq_game_sessions_session_id")),
    )
    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("entry_id", sa.String(length=41), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_processed_events")),
    )
    op.create_table(
        "stream_checkpoints",
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("last_entry_id", sa.String(length=41), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("stream", name=op.f("pk_stream_checkpoints")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("username_key", sa.String(length=32), nullable=False),
        sa.Column("password_hash", sa.String(length=72), nullable=False),
        sa.Column("wallet", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username_key", name=op.f("uq_users_username_key")),
    )
    op.create_table(
        "game_results",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("outcome", sa.String(length=8), nullable=False),
        sa.Column("earnings", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["game_sessions.id"],
            name=op.f("fk_game_results_session_pk_game_sessions"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_game_results_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_game_results")),
        sa.UniqueConstraint("session_pk", "user_id", name=op.f("uq_game_results_session_pk")),
    )
    with op.batch_alter_table("game_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_game_results_user_id"), ["user_id"], unique=False)

    op.create_table(
        "session_players",
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["game_sessions.id"],
            name=op.f("fk_session_players_session_pk_game_sessions"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_session_players_user_id_users")
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_session_players")),
    )
    with op.batch_alter_table("session_players", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_session_players_session_pk"), ["session_pk"], unique=False
        )

    op.create_table(
        "stats",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("win_count", sa.Integer(), nullable=False),
        sa.Column("loss_count", sa.Integer(), nullable=False),
        sa.Column("earnings", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_stats_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stats")),
        sa.UniqueConstraint("user_id", name=op.f("uq_stats_user_id")),
    )
    op.create_table(
        "leaderboard",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("stats_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("earnings", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["stats_id"], ["stats.id"], name=op.f("fk_leaderboard_stats_id_stats")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leaderboard")),
        sa.UniqueConstraint("stats_id", name=op.f("uq_leaderboard_stats_id")),
    )
    with op.batch_alter_table("leaderboard", schema=None) as batch_op:
        batch_op.create_index("ix_leaderboard_earnings", ["earnings"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("leaderboard", schema=None) as batch_op:
        batch_op.drop_index("ix_leaderboard_earnings")

    op.drop_table("leaderboard")
    op.drop_table("stats")
    with op.batch_alter_table("session_players", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_session_players_session_pk"))

    op.drop_table("session_players")
    with op.batch_alter_table("game_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_game_results_user_id"))

    op.drop_table("game_results")
    op.drop_table("users")
    op.drop_table("stream_checkpoints")
    op.drop_table("processed_events")
    op.drop_table("game_sessions")

"""world_version: a count of the commits that changed players or sessions

On PostgreSQL, statement triggers bump it whenever anything but an event batch
changes `users`, `stats`, `leaderboard`, `game_sessions`, `session_players` or
`waiting_events` (an operator's UPDATE, a rank refresh); an event batch bumps it once
itself. An event worker that finds the value its last batch left knows nobody else
wrote: it keeps the players and live sessions it read (`WorldCache`), as it does with
SQLite's `PRAGMA data_version`. Registrations only insert players nobody has read
yet, so inserts into the player tables do not count.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTION = "usermgmt_world_changed"
# table: the changes that count (players are only inserted by a registration).
WATCHED = {
    "users": "UPDATE OR DELETE OR TRUNCATE",
    "stats": "UPDATE OR DELETE OR TRUNCATE",
    "leaderboard": "UPDATE OR DELETE OR TRUNCATE",
    "game_sessions": "INSERT OR UPDATE OR DELETE OR TRUNCATE",
    "session_players": "INSERT OR UPDATE OR DELETE OR TRUNCATE",
    "waiting_events": "INSERT OR UPDATE OR DELETE OR TRUNCATE",
}


def upgrade() -> None:
    op.create_table(
        "world_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_world_version")),
    )
    op.execute("INSERT INTO world_version (id, version) VALUES (1, 0)")
    if op.get_bind().dialect.name != "postgresql":
        return
    # An event batch marks its transaction (`usermgmt.world_writer`) and bumps once.
    op.execute(
        f"CREATE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ "  # noqa: S608 - constants
        "BEGIN "
        "IF coalesce(current_setting('usermgmt.world_writer', true), '') <> 'events' THEN "
        "UPDATE world_version SET version = version + 1; "
        "END IF; "
        "RETURN NULL; "
        "END $$"
    )
    for table, changes in WATCHED.items():
        op.execute(
            f"CREATE TRIGGER {table}_world_changed AFTER {changes} ON {table} "
            f"FOR EACH STATEMENT EXECUTE PROCEDURE {FUNCTION}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER {table}_world_changed ON {table}")
        op.execute(f"DROP FUNCTION {FUNCTION}()")
    op.drop_table("world_version")

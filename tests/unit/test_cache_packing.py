"""The event worker's packed user-hash writes: exactly what redis-py would have sent."""

from __future__ import annotations

from hiredis import pack_command

from usermgmt.domain.auth import UserView
from usermgmt.domain.games import Player
from usermgmt.persistence.cache import CommandBatch, PlayerHashes, queue_user
from usermgmt.persistence.keys import Keys


def packed(*commands: tuple[str, ...]) -> bytes:
    return b"".join(pack_command(command) for command in commands)  # type: ignore[arg-type]


def fields(player: Player) -> tuple[str, ...]:
    return (
        *("id", str(player.id), "username", player.username),
        *("wallet", str(player.wallet), "win_count", str(player.win_count)),
        *("loss_count", str(player.loss_count), "earnings", str(player.earnings)),
        *("rank", str(player.rank)),
    )


def test_a_free_player_has_no_session_field_and_a_ttl() -> None:
    player = Player(12, "Alice", 5, 1234, 3, 4, 99, rank=7)
    batch = CommandBatch()
    PlayerHashes(Keys("um"), ttl=300).queue(batch, player, None)
    key = "um:user:alice"
    assert batch.count == 3
    assert b"".join(batch.parts) == packed(
        ("HSET", key, *fields(player)), ("HDEL", key, "session"), ("EXPIRE", key, "300")
    )


def test_a_player_in_a_live_session_gets_its_id() -> None:
    player = Player(7, "bob.b", 5, 0, 0, 0, 0)
    batch = CommandBatch()
    PlayerHashes(Keys("pfx"), ttl=60).queue(batch, player, "eu-1:000042")
    key = "pfx:user:bob.b"
    assert batch.count == 2
    assert b"".join(batch.parts) == packed(
        ("HSET", key, *fields(player), "session", "eu-1:000042"), ("EXPIRE", key, "60")
    )


def test_numbers_are_written_as_they_are_now_and_a_renamed_id_is_packed_again() -> None:
    hashes = PlayerHashes(Keys("um"), ttl=300, limit=1)
    player = Player(1, "carol", 1, 0, 0, 0, 0)
    hashes.queue(CommandBatch(), player, None)
    player.wallet, player.win_count, player.earnings = 10**12, 1, 10**12
    batch = CommandBatch()
    hashes.queue(batch, player, None)
    assert pack_command(("HSET", "um:user:carol", *fields(player))) in b"".join(batch.parts)
    other = Player(1, "Dave", 1, 0, 0, 0, 0)  # the same id under another name
    hashes.queue(CommandBatch(), Player(2, "erin", 2, 0, 0, 0, 0), None)  # over the limit
    batch = CommandBatch()
    hashes.queue(batch, other, None)
    assert b"".join(batch.parts).startswith(pack_command(("HSET", "um:user:dave", *fields(other))))


def test_a_user_view_is_packed_as_a_player_is() -> None:
    """`queue_user` (registrations, cache misses) writes the event worker's commands."""
    player = Player(12, "Alice", 5, 1234, 3, 4, 99, rank=7)
    view = UserView(id=12, username="Alice", wallet=1234, win_count=3, loss_count=4,
                    earnings=99, rank=7)  # fmt: skip
    for session in (None, "eu-1:000042"):
        mine, theirs = CommandBatch(), CommandBatch()
        queue_user(mine, Keys("um"), view.model_copy(update={"session": session}), ttl=300)
        PlayerHashes(Keys("um"), ttl=300).queue(theirs, player, session)
        assert (mine.count, mine.parts) == (theirs.count, theirs.parts)
        assert mine.count == (3 if session is None else 2)

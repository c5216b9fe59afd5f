"""The game rules: how update and terminate events change the world, and when they wait.

`plan_batch` decides a batch's entries in their merged order (`entry_order`) against
a `World`, together with the entries still waiting from earlier batches (`Waiters`).
An entry is applied once what it depends on has been applied, and no sooner:

- a session's updates go in their stream's order, and its terminate after its
  update (a terminate that comes first waits for the session's first update);
- an update that puts a player into its session waits until that player's previous
  live session has ended (or dropped them), unless that session has been silent
  for `session_timeout_ms`: then it is ended as `expired` (every such session the
  update needs, whatever the order of its players, even if it then waits for another
  busy player; the ended session's own waiting entries are then decided again at once:
  `session_ended`);
- nothing overtakes an earlier waiting entry it depends on: later entries of the
  same session, and later updates wanting the same player, queue behind it.

Whatever an applied entry makes possible is decided again at once, in order, so a
chain of any length resolves in one pass. Time is entry-id time: a waiter whose
entry is more than `max_wait_ms` older than the clock (the next entry decided, or
the batch's horizon) is dead-lettered as `wait_timeout`. The same entries in the
same order give the same decisions, however they are cut into batches: that is what
makes a replay, or several workers, reach the live worker's tables.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.events import MAX_EARNINGS, TerminateEvent, UpdateEvent
from usermgmt.domain.games import (
    APPLIED,
    BIGINT_MAX,
    DUPLICATE,
    ENDED,
    Changes,
    Decision,
    Order,
    Outcome,
    PlannedEntry,
    Player,
    ResultRow,
    Session,
    StatsDelta,
    World,
)
from usermgmt.domain.waiting import Limits, Waiter, Waiters, Wake

EXPIRED = "expired"  # the end reason of a session ended for silence
NEAR_BIGINT = BIGINT_MAX - MAX_EARNINGS  # below it, no single result can pass the limit
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)  # entry-id time is whole milliseconds: no floats


@dataclass
class Plan:
    """What a batch decided: final decisions, what it writes, and how the waiting changed."""

    decided: list[tuple[PlannedEntry, Decision]] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    waits_added: list[Waiter] = field(default_factory=list)  # new, or waiting for another thing
    waits_removed: list[PlannedEntry] = field(default_factory=list)  # waited, now decided
    expired_sessions: list[str] = field(default_factory=list)


def plan_batch(
    world: World,
    entries: Sequence[PlannedEntry],
    waiters: Waiters,
    limits: Limits,
    horizon_ms: int | None = None,
    restored: Sequence[tuple[PlannedEntry, str]] = (),
    recorded: Mapping[tuple[str, str], Decision] | None = None,
) -> Plan:
    """Decide `entries` (in merged order) and the `waiters` they set free; both are updated.

    `horizon_ms`: every entry of an earlier millisecond is known (in `entries`, or
    decided before): waiters older than it by more than `max_wait_ms` time out.
    `restored`: waiting entries as recorded (with what they waited for), when `waiters`
    does not hold them: decided again first, which puts each back where it waits.
    `recorded`: dead-letter decisions already committed for some of `entries` (by
    stream kind and entry id): a redelivery after a crash gets the same decision.
    """
    planner = _Planner(world, waiters, limits, recorded or {})
    planner.restore(restored)
    for entry in entries:
        planner.advance(entry.ms)
        planner.decide(entry)
        planner.drain()
    if horizon_ms is not None:
        planner.advance(horizon_ms)
    return planner.finish()


class _Planner:
    def __init__(
        self,
        world: World,
        waiters: Waiters,
        limits: Limits,
        recorded: Mapping[tuple[str, str], Decision],
    ) -> None:
        self.recorded = recorded
        self.world = world
        self.waiters = waiters
        self.limits = limits
        self.before = {order: waiter.waits_for for order, waiter in waiters.by_order.items()}
        self.plan = Plan()
        self.changes = self.plan.changes
        self.woken: list[Order] = []  # a heap: waiters to decide again, in order
        self.clock_ms = 0
        self._times: dict[int, datetime] = {}

    # -- the sequence --------------------------------------------------------------------

    def advance(self, clock_ms: int) -> None:
        """Move the clock; waiters past `max_wait_ms` are dead-lettered, oldest first."""
        self.clock_ms = max(self.clock_ms, clock_ms)
        limit = self.limits.max_wait_ms
        while (oldest := self.waiters.oldest()) is not None and oldest.entry.ms + limit < clock_ms:
            self.waiters.take(oldest.entry.order)
            message = f"waited more than {limit / 1000:g} s for {oldest.waits_for}"
            self.resolve(
                oldest.entry, Decision(Outcome.DEAD, DeadLetterReason.WAIT_TIMEOUT, message)
            )
            self.drain()

    def restore(self, restored: Sequence[tuple[PlannedEntry, str]]) -> None:
        for entry, waits_for in sorted(restored, key=lambda item: item[0].order):
            self.before[entry.order] = waits_for
            self.decide(entry)
            self.drain()

    def drain(self) -> None:
        """Decide again, in order, every waiter that what was just applied set free."""
        while self.woken:
            waiter = self.waiters.take(heapq.heappop(self.woken))
            if waiter is None:
                continue
            self.decide(waiter.entry)
            now = self.waiters.by_order.get(waiter.entry.order)
            if now is not None and waiter.holds and not now.holds:
                self.wake_queued(waiter.entry)  # it no longer holds what follows it

    def wake(self, kind: str, key: object) -> None:
        """Decide again the waiters `Wake(kind, key)` sets free (nothing to look up while
        nothing waits, as in most batches: called for every entry and freed player)."""
        if self.waiters.by_order:
            for order in self.waiters.woken_by((kind, key)):
                heapq.heappush(self.woken, order)

    def wake_queued(self, entry: PlannedEntry, session_only: bool = False) -> None:
        """Decide again the entries queued behind others that share `entry`'s session or
        players: with `entry` decided, what holds them may have changed (`session_only`:
        only its session's)."""
        if self.waiters:
            for order in self.waiters.queued_after(entry, session_only):
                heapq.heappush(self.woken, order)

    def decide(self, entry: PlannedEntry) -> None:
        event = entry.event
        if self.recorded and (dead := self.recorded.get((entry.stream_kind, entry.entry_id))):
            self.resolve(entry, dead)
        elif entry.event_id in self.world.processed:
            self._touch_for_duplicate(entry)
            self.resolve(entry, DUPLICATE)
        elif (first := self.waiters.copy_before(entry)) is not None:
            # A second copy of a waiting event is decided once the first is (a duplicate
            # then); it holds nothing, as it adds nothing to what the first copy holds.
            what = f"the first copy of its event, {first.entry.stream_kind} {first.entry.entry_id}"
            self.wait(entry, Wake("entry", first.entry.order), what, holds=False)
        elif isinstance(event, UpdateEvent):
            self._update(entry, event)
        else:
            assert isinstance(event, TerminateEvent)
            self._terminate(entry, event)

    def resolve(self, entry: PlannedEntry, decision: Decision, others: Iterable[int] = ()) -> None:
        """A final decision; entries queued behind this one are decided again.

        `others`: users an applied entry touched beyond the players it names.

        Only what the decision can change is woken: the entries queued right behind this
        one (`Wake.entry`), and, when it applied, those of its session queued behind
        others. An entry queued behind another waits for that one whatever else is
        decided, but for what an update wants: the players not yet in its own session.
        An applied update changes that only for its own session's entries (a player it
        adds is in their session now; one it drops is free, and wanted by them again);
        for any other session's, a player it moves was and stays in another session, and
        a player freed is woken as such (`Wake.player`). A dead letter changes nothing.
        Waking every entry that shares a player, as before, re-decided each of them at
        every decision: with thousands waiting behind one lost terminate, their timeouts
        took minutes of CPU, for the same decisions.
        """
        self.plan.decided.append((entry, decision))
        if entry.order in self.before:
            self.plan.waits_removed.append(entry)
        self.wake("entry", entry.order)
        if decision.outcome is Outcome.APPLIED:
            self.world.processed.add(entry.event_id)
            touched = ",".join(map(str, sorted(others))) or None
            self.changes.processed.append(
                (entry.event_id, entry.stream_kind, entry.entry_id, touched)
            )
            self.wake_queued(entry, session_only=True)

    def wait(self, entry: PlannedEntry, wake: Wake, waits_for: str, holds: bool = True) -> None:
        self.waiters.add(Waiter(entry, waits_for, wake, holds))

    def queue_behind(self, entry: PlannedEntry, wanted: Sequence[str] = ()) -> bool:
        """Wait behind an earlier waiting entry `entry` must not overtake, if there is one."""
        holder = self.waiters.holder_before(entry, wanted)
        if holder is None:
            return False
        held = holder.entry
        what = f"{held.stream_kind} {held.entry_id} (session {held.event.session_id})"
        self.wait(entry, Wake("entry", held.order), what)
        return True

    def finish(self) -> Plan:
        """The waiting entries to record and to forget, against those the batch began with."""
        for order, waiter in self.waiters.by_order.items():
            if self.before.get(order) != waiter.waits_for:
                self.plan.waits_added.append(waiter)
        return self.plan

    # -- the rules -------------------------------------------------------------------

    def _update(self, entry: PlannedEntry, event: UpdateEvent) -> None:
        players = self._players(event.player_keys)
        if players is None:
            self.resolve(entry, self._unknown(event.players, event.player_keys))
            return
        session = self.world.sessions.get(event.session_id)
        if session is not None and session.ended:
            self.resolve(entry, _session_ended(event.session_id))
            return
        live = self.world.live_session_of
        wanted = [
            key
            for key, player in zip(event.player_keys, players, strict=True)
            if live.get(player.id) != event.session_id
        ]
        # Every silent session it needs ends at its first decision, whatever the order
        # of its players, also when the update then waits: behind an earlier update
        # that wants one of its players (freed by the expiry, that one now goes first)
        # or for a busy player.
        busy: Player | None = None
        for player in players:
            current = live.get(player.id)
            if current is None or current == event.session_id:
                continue
            if self._is_silent(current, entry.ms):
                self._expire(current, entry.ms)
            elif busy is None:
                busy = player
        if self.queue_behind(entry, wanted):
            return
        if busy is not None:
            self.wait(
                entry,
                Wake("player", busy.id),
                f"player {busy.username} to leave live session {live[busy.id]}",
            )
            return
        dropped = self._apply_update(entry, event, players, session)
        self.resolve(entry, APPLIED, dropped)
        self.wake("session", event.session_id)

    def _apply_update(
        self,
        entry: PlannedEntry,
        event: UpdateEvent,
        players: list[Player],
        session: Session | None,
    ) -> list[int]:
        """Create or replace the session; returns the players it dropped."""
        at = self._time(entry.ms)
        new_roster = [player.id for player in players]
        dropped: list[int] = []
        if session is None:
            session = Session(
                event.session_id,
                event.status,
                new_roster,
                dict(event.meta),
                created_at=at,
                updated_at=at,
            )
            self.world.sessions[event.session_id] = session
        else:
            dropped = sorted(set(session.roster).difference(new_roster))
            for user_id in dropped:
                self._set_membership(user_id, None)
            session.roster = new_roster
            session.status = event.status
            session.meta = dict(event.meta)
            session.updated_at = at
        for user_id in new_roster:
            self._set_membership(user_id, event.session_id)
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)
        return dropped

    def _terminate(self, entry: PlannedEntry, event: TerminateEvent) -> None:
        session = self.world.sessions.get(event.session_id)
        if session is not None and session.ended:
            self.resolve(entry, _session_ended(event.session_id))
            return
        players = self._players(event.result_keys)
        if players is None:
            self.resolve(entry, self._unknown(event.result_usernames, event.result_keys))
            return
        if self.queue_behind(entry):
            return
        if session is None:
            # Holds nothing: the update it waits for must be able to pass it.
            self.wait(
                entry,
                Wake("session", event.session_id),
                f"the first update of session {event.session_id}",
                holds=False,
            )
            return
        outsiders = [p.username for p in players if p.id not in session.roster]
        if outsiders:
            message = f"not in the roster of {event.session_id}: {', '.join(outsiders)}"
            self.resolve(entry, Decision(Outcome.DEAD, DeadLetterReason.NOT_IN_ROSTER, message))
            return
        if past_bigint := _past_bigint(players, event):
            message = (
                f"crediting would take the wallet or earnings of {', '.join(past_bigint)} "
                f"past {BIGINT_MAX}, the largest a BIGINT holds"
            )
            self.resolve(entry, Decision(Outcome.DEAD, DeadLetterReason.INVALID_EVENT, message))
            return
        unfinished = set(session.roster).difference(p.id for p in players)
        self._credit(session, players, event)
        self._end(session, event.reason, entry.ms)
        self.resolve(entry, APPLIED, unfinished)

    def _credit(self, session: Session, players: list[Player], event: TerminateEvent) -> None:
        stats, results, touched = (
            self.changes.stats,
            self.changes.results,
            self.changes.touched_users,
        )
        for player, result in zip(players, event.results, strict=True):
            uid, earned = player.id, result.earnings
            delta = stats.get(uid)
            if delta is None:
                delta = stats[uid] = StatsDelta()
            if result.outcome == "win":
                delta.wins += 1
                player.win_count += 1
            else:
                delta.losses += 1
                player.loss_count += 1
            delta.earnings += earned
            player.earnings += earned
            player.wallet += earned
            results.append(ResultRow(session.session_id, uid, result.outcome, earned))
            touched.add(uid)

    def _end(self, session: Session, reason: str, at_ms: int) -> None:
        """End `session`; its waiting entries are decided again (as `session_ended`), at
        once, as a new worker restoring them would: an update of a session expired while
        it waited must not wait on for the players it wanted."""
        for order in self.waiters.of_session(session.session_id):
            heapq.heappush(self.woken, order)
        for user_id in session.roster:
            self._set_membership(user_id, None)
        at = self._time(at_ms)
        session.status = ENDED
        session.end_reason = reason
        session.ended_at = at
        session.updated_at = at
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)

    def _is_silent(self, session_id: str, at_ms: int) -> bool:
        """Whether a live session has had no event for `session_timeout_ms` as of `at_ms`."""
        timeout = self.limits.session_timeout_ms
        session = self.world.sessions.get(session_id)
        if timeout <= 0 or session is None:
            return False
        last_ms = (session.updated_at - EPOCH) // MILLISECOND
        return last_ms + timeout < at_ms

    def _expire(self, session_id: str, at_ms: int) -> None:
        """End a silent live session as expired (no results)."""
        self._end(self.world.sessions[session_id], EXPIRED, at_ms)
        self.plan.expired_sessions.append(session_id)

    def _set_membership(self, user_id: int, session_id: str | None) -> None:
        live = self.world.live_session_of
        before = self.changes.membership_before
        if user_id not in before:
            before[user_id] = live.get(user_id)
        if session_id is None:
            if live.pop(user_id, None) is not None:
                self.wake("player", user_id)
        else:
            live[user_id] = session_id
        self.changes.membership[user_id] = session_id
        self.changes.touched_users.add(user_id)

    # -- helpers ---------------------------------------------------------------------

    def _players(self, keys: Sequence[str]) -> list[Player] | None:
        """The players `keys` name (their `username_key`s); None when one is unknown."""
        found = list(map(self.world.players.get, keys))
        return found if all(found) else None  # type: ignore[return-value]

    def _unknown(self, names: Sequence[str], keys: Sequence[str]) -> Decision:
        """The dead letter for an entry naming players nobody registered."""
        known = self.world.players
        unknown = [name for name, key in zip(names, keys, strict=True) if key not in known]
        message = f"unknown players: {', '.join(unknown)}"
        return Decision(Outcome.DEAD, DeadLetterReason.UNKNOWN_USER, message)

    def _time(self, ms: int) -> datetime:
        """Entry-id time as a timestamp (a session's times are its events' times)."""
        moment = self._times.get(ms)
        if moment is None:
            moment = self._times[ms] = EPOCH + ms * MILLISECOND
        return moment

    def _touch_for_duplicate(self, entry: PlannedEntry) -> None:
        """A duplicate changes nothing but still refreshes the caches it would have."""
        event = entry.event
        self.changes.touched_sessions.add(event.session_id)
        session = self.world.sessions.get(event.session_id)
        if session is not None:
            self.changes.touched_users.update(session.roster)
        keys = event.player_keys if isinstance(event, UpdateEvent) else event.result_keys
        known = self.world.players
        self.changes.touched_users.update(known[key].id for key in keys if key in known)
        self.changes.touched_users.update(self.world.also_touched.get(entry.event_id, ()))


def _session_ended(session_id: str) -> Decision:
    message = f"session {session_id} has already ended"
    return Decision(Outcome.DEAD, DeadLetterReason.SESSION_ENDED, message)


def _past_bigint(players: list[Player], event: TerminateEvent) -> list[str]:
    """The players whose wallet or earnings the results would take past `BIGINT_MAX`.

    A plain loop first (a quarter of the time of the full check, on every terminate):
    only a balance within one game's largest earnings of the limit is looked at closer.
    """
    for player in players:
        if player.wallet > NEAR_BIGINT or player.earnings > NEAR_BIGINT:
            break
    else:
        return []
    return [
        player.username
        for player, result in zip(players, event.results, strict=True)
        if max(player.wallet, player.earnings) > BIGINT_MAX - result.earnings
    ]
